import ArgumentParser
import Foundation

extension Mirrorfs {
    struct Unmount: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Unmount a mirrorfs mount; its daemon then exits.")

        @Argument(help: "The mountpoint.") var mountpoint: String

        func run() throws {
            guard let resolved = realpath(mountpoint, nil) else {
                throw CLIError("mountpoint '\(mountpoint)': \(String(cString: strerror(errno)))")
            }
            let path = String(cString: resolved)
            free(resolved)
            guard MountTable.isMirrorfsMount(path) else {
                throw CLIError("'\(mountpoint)' is not a mirrorfs mount")
            }
            if umount2(path, 0) == 0 { return }
            let reason = errno
            if reason == EBUSY { throw CLIError("'\(mountpoint)' is busy: a process still uses it") }
            guard reason == EPERM else { throw CLIError("cannot unmount '\(mountpoint)': \(String(cString: strerror(reason)))") }
            // Not root: the setuid helper unmounts mounts the caller owns.
            let helper = Process()
            helper.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount3")
            helper.arguments = ["-u", path]
            try helper.run()
            helper.waitUntilExit()
            guard helper.terminationStatus == 0 else { throw CLIError("fusermount3 -u '\(mountpoint)' failed") }
        }
    }
}

/// /proc/self/mountinfo, read to tell mirrorfs mounts apart.
enum MountTable {
    static func isMirrorfsMount(_ path: String) -> Bool {
        guard let table = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return false }
        for line in table.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 4, let dash = fields.firstIndex(of: "-"), dash + 1 < fields.count else { continue }
            // Mount points escape spaces and the like as octal (\040).
            if unescape(String(fields[4])) == path && fields[dash + 1] == "fuse.mirrorfs" { return true }
        }
        return false
    }

    private static func unescape(_ field: String) -> String {
        var out = [UInt8]()
        var bytes = Array(field.utf8)[...]
        while let b = bytes.popFirst() {
            if b == UInt8(ascii: "\\"), bytes.count >= 3,
               let value = UInt8(String(decoding: bytes.prefix(3), as: UTF8.self), radix: 8) {
                out.append(value)
                bytes = bytes.dropFirst(3)
            } else {
                out.append(b)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
