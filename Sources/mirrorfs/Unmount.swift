import ArgumentParser
import Foundation
import MirrorCore
import MirrorSetup

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
            // What an unfinished job leaves behind, said after the unmount.
            let unfinished = (try? ControlClient(mountpoint: path).currentJob()) ?? nil
            func done() { if let unfinished { print(LeftBehind.describe(unfinished)) } }
            if umount2(path, 0) == 0 { return done() }
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
            done()
        }
    }
}

/// What an unfinished job leaves behind, in one line: for `unmount`, `job cancel` and the log.
enum LeftBehind {
    static func describe(_ job: JSONValue) -> String {
        func string(_ key: String) -> String? { if case .string(let s)? = job[key] { return s }; return nil }
        let id = string("device") ?? "?"
        let target = string("target") ?? "the target"
        let ready = { if case .bool(true)? = job["ready"] { return true }; return false }()
        var text = ready
            ? "job '\(id)' was ready but not completed: '\(target)' lags behind the image"
            : "job '\(id)' did not finish: '\(target)' is a partial copy"
        if let log = string("dirty-log") {
            text += "; its dirty log '\(log)' is kept: mount again with the same --target to resume"
        } else {
            text += "; it has no dirty log: a new job copies everything"
        }
        return text
    }
}
