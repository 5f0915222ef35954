import CLinux
import Foundation

/// The child's half of `--daemonize`: one line on a pipe, "ready" or "error <message>".
final class ReadyPipe: Sendable {
    let fd: Int32
    init(fd: Int32) { self.fd = fd }

    func report(success: Void) { send("ready\n") }
    func report(failure message: String) { send("error \(message)\n") }

    private func send(_ line: String) {
        let bytes = Array(line.utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
}

extension Daemon {
    /// `/var/log/mirrorfs/<mountpoint>.log` for root, else the per-user runtime directory.
    static func defaultLogPath(for mountpoint: String) throws -> String {
        let name = RuntimeDirectory.name(for: mountpoint, suffix: ".log")
        if getuid() == 0 {
            let directory = "/var/log/mirrorfs"
            if mkdir(directory, 0o750) == 0 || errno == EEXIST { return directory + "/" + name }
        }
        return try RuntimeDirectory.path() + "/" + name
    }
}

/// `--daemonize` re-spawns this executable in the foreground mode, detached in its own
/// session with its output in the log file, instead of forking a process that may
/// already run threads. The parent returns only when the child reports the mount usable.
enum Daemon {
    static func spawnAndWait(arguments: [String], mountpoint: String, logFile: String?) throws {
        let log = try logFile ?? defaultLogPath(for: mountpoint)
        let logFD = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard logFD >= 0 else { throw CLIError("cannot open log file '\(log)': \(String(cString: strerror(errno)))") }
        defer { close(logFD) }
        var pipeFDs: [Int32] = [0, 0]
        guard clinux_pipe2_cloexec(&pipeFDs) == 0 else { throw CLIError("pipe: \(String(cString: strerror(errno)))") }
        let (readEnd, writeEnd) = (pipeFDs[0], pipeFDs[1])
        let childFD: Int32 = 3
        var childArguments = arguments.filter { $0 != "--daemonize" }
        childArguments += ["--ready-fd", String(childFD)]
        // The child rotates the log it writes, so it must know its path.
        if logFile == nil { childArguments += ["--log-file", log] }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, logFD, 1)
        posix_spawn_file_actions_adddup2(&actions, logFD, 2)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, childFD)  // dup2 clears CLOEXEC
        // The daemon keeps nothing of the caller's: no inherited pipe or socket would
        // hold a caller waiting for EOF (a shell's $(...), a test harness).
        clinux_spawn_addclosefrom(&actions, childFD + 1)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(CLINUX_POSIX_SPAWN_SETSID))

        var pid: pid_t = 0
        let argv = childArguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // The executable's own path: /proc/self/exe is not executable for a process
        // that may not read its binary.
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? arguments[0]
        let status = posix_spawn(&pid, executable, &actions, &attributes, argv, environ)
        close(writeEnd)
        defer { close(readEnd) }
        guard status == 0 else { throw CLIError("cannot start the daemon: \(String(cString: strerror(status)))") }

        var reply = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 512)
        while true {
            let n = read(readEnd, &chunk, chunk.count)
            if n > 0 { reply += chunk[0..<n]; continue }
            if n < 0 && errno == EINTR { continue }
            break
        }
        let line = String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if line == "ready" { return }
        if line.hasPrefix("error ") { throw CLIError(String(line.dropFirst("error ".count))) }
        var waitStatus: Int32 = 0
        waitpid(pid, &waitStatus, 0)
        throw CLIError("the daemon exited before the mount was ready; see \(log)")
    }
}
