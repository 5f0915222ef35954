import CLinux
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
                if MountTable.daemonGone(errno) { return try detachStale() }
                throw CLIError("mountpoint '\(mountpoint)': \(String(cString: strerror(errno)))")
            }
            let path = String(cString: resolved)
            free(resolved)
            guard MountTable.isMirrorfsMount(path) else {
                throw CLIError("'\(mountpoint)' is not a mirrorfs mount")
            }
            let pidRead = MountTable.readRootAttribute(RootAttribute.pid, of: path, timeout: ControlClient.replyDeadline)
            if case .failed(let reason) = pidRead, MountTable.daemonGone(reason) { return try detachStale() }
            // What an unfinished job leaves behind, said after the unmount.
            // Asked only of a mount that answers (a stopped daemon would hold the reads).
            let daemon: pid_t? = if case .value(let pid) = pidRead { pid_t(pid) } else { nil }
            // (A mount that did not answer the pid read is not asked again.)
            let client = daemon == nil ? nil : try? ControlClient(mountpoint: path)
            let unfinished = (try? client?.currentJob()) ?? nil
            func done() {
                if let unfinished { print(LeftBehind.describe(unfinished)) }
                // Return once the daemon has flushed, recorded the stop and let go of its image
                // locks, so that the next command (a remount, qemu-img) finds them free.
                guard let daemon else { return }
                let deadline = Date().addingTimeInterval(30)
                while Self.isRunning(daemon) {
                    guard Date() < deadline else {
                        print("the daemon (pid \(daemon)) is still finishing; its image locks go when it exits")
                        return
                    }
                    usleep(10_000)
                }
            }
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

        /// A mount whose daemon is gone ("Transport endpoint is not connected"): detached,
        /// with the command that mounts it again.
        private func detachStale() throws {
            let url = URL(fileURLWithPath: mountpoint)
            guard let parent = realpath(url.deletingLastPathComponent().path, nil) else {
                throw CLIError("mountpoint '\(mountpoint)': \(String(cString: strerror(errno)))")
            }
            let path = String(cString: parent) + "/" + url.lastPathComponent
            free(parent)
            guard let mount = MountTable.mirrorfsMounts().first(where: { $0.mountpoint == path }) else {
                throw CLIError("'\(mountpoint)' is a stale mount that is not mirrorfs's; clear it with 'fusermount3 -u \(mountpoint)'")
            }
            guard umount2(path, Int32(MNT_DETACH)) == 0 else {
                throw CLIError("cannot detach the stale mount '\(mountpoint)': \(String(cString: strerror(errno)))")
            }
            print("the daemon of '\(mountpoint)' was gone: detached its stale mount; 'mirrorfs mount \(mount.source) \(mountpoint)' mounts it again, with the same --target to resume its job")
        }

        /// Whether `pid` still runs (a zombie nobody reaps has let go of everything).
        private static func isRunning(_ pid: pid_t) -> Bool {
            guard kill(pid, 0) == 0 || errno != ESRCH else { return false }
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { return false }
            guard stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("Z") else { return true }
            // A zombie leader whose other threads still exit (they hold the process's
            // descriptors, and with them the image locks) is still running.
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"))?.count ?? 0
            return tasks > 1
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
