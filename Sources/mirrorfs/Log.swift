import Foundation

/// The daemon's log: stderr, which `--daemonize` points at the log file.
enum Log {
    static func info(_ message: String) {
        let stamp = ISO8601DateFormatter().string(from: Date())
        FileHandle.standardError.write(Data("\(stamp) mirrorfs[\(getpid())]: \(message)\n".utf8))
    }
}

/// Where a daemon keeps files that are not the user's: `$XDG_RUNTIME_DIR/mirrorfs`,
/// else `/tmp/mirrorfs-<uid>` (mode 0700).
enum RuntimeDirectory {
    static func path() throws -> String {
        let base: String
        if let xdg = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !xdg.isEmpty {
            base = xdg + "/mirrorfs"
        } else {
            base = "/tmp/mirrorfs-\(getuid())"
        }
        if mkdir(base, 0o700) != 0 && errno != EEXIST {
            throw CLIError("cannot create \(base): \(String(cString: strerror(errno)))")
        }
        return base
    }

    /// A file name for per-mount files: the mountpoint's path with '/' turned into '_'.
    static func name(for mountpoint: String, suffix: String) -> String {
        String(mountpoint.dropFirst().map { $0 == "/" ? "_" : $0 }) + suffix
    }
}
