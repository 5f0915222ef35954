import ArgumentParser
import Foundation
import MirrorCore
import MirrorNBD
import MirrorQMP

extension Mirrorfs {
    struct Job: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Control the mount's mirror job.",
            subcommands: [Start.self, Change.self, Complete.self, Cancel.self, Pause.self, Resume.self, SetSpeed.self])
    }
}

/// Waits for the job's end; throws if it failed, or if it stops where it cannot end
/// without the operator (paused, or stopped by an error): the line says why and what to do.
/// Returns the final event's name.
private func waitForEnd(_ client: ControlClient, mountpoint: String) throws -> String {
    var ending = ""
    var said = false
    while true {
        guard let event = try client.nextEvent(timeout: 1) else {
            guard let job = try client.currentJob() else { return ending }
            try refuseToWaitOn(job, mountpoint: mountpoint)
            if !said, case .string(let status)? = job["status"], case .int(let dirty)? = job["dirty-bytes"] {
                // Not silently: the job still converges (writes keep dirtying what it copies).
                print("waiting for the job to converge: \(status), \(dirty) bytes still to copy")
                said = true
            }
            continue
        }
        guard case .string(let name)? = event["event"] else { continue }
        if name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED" {
            if case .string(let error)? = event["data"]?["error"] { throw CLIError("the job failed: \(error)") }
            ending = name
        }
        if name == "JOB_STATUS_CHANGE", case .string("null")? = event["data"]?["status"] { return ending }
    }
}

/// A job that is paused (by the user or by `stop` after an error) does not end by itself.
private func refuseToWaitOn(_ job: JSONValue, mountpoint: String) throws {
    guard case .bool(true)? = job["paused"] else { return }
    if case .string(let ioStatus)? = job["io-status"], ioStatus != "ok" {
        throw CLIError("the job is stopped by a target error (io-status \(ioStatus)): fix the target, then 'mirrorfs job resume \(mountpoint)'")
    }
    throw CLIError("the job is paused: it cannot finish until 'mirrorfs job resume \(mountpoint)'")
}

extension Mirrorfs.Job {
    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Start mirroring the mounted image to --target.")
        @Argument(help: "The mountpoint.") var mountpoint: String
        @OptionGroup var job: JobOptions

        func run() throws {
            guard let target = job.target else { throw CLIError("job start needs --target") }
            let client = try ControlClient(mountpoint: mountpoint)
            guard let imageName = StatusLine.imageName(in: mountpoint) else { throw CLIError("'\(mountpoint)' shows no image") }
            // The daemon checks the target, as for `mount --target` (one setup path); the
            // CLI only picks the mode that means "create it, or reuse it".
            let isNBD = NBDBlockDevice.isURI(target)
            let absolute = isNBD ? target : URL(fileURLWithPath: target).standardizedFileURL.path
            let exists = isNBD || access(absolute, F_OK) == 0
            let options = try job.mirrorOptions(defaultJobID: imageName)
            var arguments: [(String, JSONValue)] = [
                ("device", .string(imageName)), ("target", .string(absolute)), ("format", "raw"),
                ("sync", .string(options.sync.rawValue)), ("mode", exists ? "existing" : "absolute-paths"),
                ("speed", .int(Int64(options.speed))), ("granularity", .int(Int64(options.granularity))),
                ("buf-size", .int(Int64(options.bufSize))), ("on-source-error", .string(options.onSourceError.rawValue)),
                ("on-target-error", .string(options.onTargetError.rawValue)), ("copy-mode", .string(options.copyMode.rawValue)),
            ]
            if let id = job.jobID { arguments.insert(("job-id", .string(id)), at: 0) }
            if let after = options.autoWriteBlockingAfter {
                arguments.append((QMPCommands.extensionPrefix + "auto-write-blocking", .int(Int64(after))))
            }
            if let stateDir = job.stateDir {
                let value = stateDir == "none" ? stateDir : URL(fileURLWithPath: stateDir).standardizedFileURL.path
                arguments.append((QMPCommands.extensionPrefix + "state-dir", .string(value)))
            }
            try client.execute("drive-mirror", arguments)
        }
    }

    struct Change: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Switch the running job to write-blocking.")
        @Argument(help: "The mountpoint.") var mountpoint: String
        @Option(help: "write-blocking (the only change a mirror job accepts).") var copyMode: CopyMode

        func run() throws {
            let client = try ControlClient(mountpoint: mountpoint)
            let id = try client.requireJobID()
            try client.execute("block-job-change", [("id", .string(id)), ("type", "mirror"), ("copy-mode", .string(copyMode.rawValue))])
        }
    }

    struct Complete: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Pivot: once source and target are equal the mount serves the target. Waits until done.")
        @Argument(help: "The mountpoint.") var mountpoint: String

        func run() throws {
            let client = try ControlClient(mountpoint: mountpoint)
            guard let job = try client.currentJob(), case .string(let id)? = job["device"] else {
                throw CLIError("no job runs on this mount")
            }
            try refuseToWaitOn(job, mountpoint: mountpoint)
            if case .bool(false)? = job["ready"] {
                let status = { if case .string(let s)? = job["status"] { return s }; return "?" }()
                let left = { if case .int(let l)? = job["len"], case .int(let o)? = job["offset"] { return " with \(max(l - o, 0)) bytes still to copy" }; return "" }()
                throw CLIError("job '\(id)' is not ready (\(status)\(left)): wait until 'mirrorfs status \(mountpoint) --watch' shows ready, then complete; under heavy writes 'mirrorfs job change \(mountpoint) --copy-mode write-blocking' lets it converge")
            }
            try client.execute("block-job-complete", [("device", .string(id))])
            _ = try waitForEnd(client, mountpoint: mountpoint)
            if let image = StatusLine.imageName(in: mountpoint),
               case .string(let target)? = job["target"] {
                print("pivoted: \(mountpoint)/\(image) now serves \(target)")
            }
        }
    }

    struct Cancel: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop the job without pivot (after ready: the target is a consistent copy). Waits until done.")
        @Argument(help: "The mountpoint.") var mountpoint: String
        @Flag(help: "Stop at once, without making the target consistent.") var force = false

        func run() throws {
            let client = try ControlClient(mountpoint: mountpoint)
            guard let job = try client.currentJob(), case .string(let id)? = job["device"] else {
                // No job: a failed one may have left its log marking writes; cancel drops it.
                let dropped: JSONValue
                do {
                    dropped = try client.execute(QMPCommands.extensionPrefix + "discard-dirty-log")
                } catch {
                    throw CLIError("no job runs on this mount")
                }
                if case .string(let log)? = dropped["dirty-log"], case .string(let target)? = dropped["target"] {
                    print("discarded the failed job's dirty log \(log): '\(target)' is a partial copy; a new job copies everything")
                }
                return
            }
            if !force { try refuseToWaitOn(job, mountpoint: mountpoint) }
            try client.execute("block-job-cancel", [("device", .string(id)), ("force", .bool(force))])
            _ = try waitForEnd(client, mountpoint: mountpoint)
            let target = { if case .string(let t)? = job["target"] { return t }; return "the target" }()
            if case .bool(true)? = job["ready"], !force {
                print("cancelled: '\(target)' is left a consistent copy of the image as of the cancel; the mount serves the source")
            } else {
                print("cancelled: '\(target)' is left a partial copy; its dirty log is discarded, so a new job copies everything")
            }
        }
    }

    struct Pause: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pause the background copy.")
        @Argument(help: "The mountpoint.") var mountpoint: String
        func run() throws {
            let client = try ControlClient(mountpoint: mountpoint)
            try client.execute("block-job-pause", [("device", .string(try client.requireJobID()))])
        }
    }

    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Resume a paused (or error-stopped) job.")
        @Argument(help: "The mountpoint.") var mountpoint: String
        func run() throws {
            let client = try ControlClient(mountpoint: mountpoint)
            try client.execute("block-job-resume", [("device", .string(try client.requireJobID()))])
        }
    }

    struct SetSpeed: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "set-speed", abstract: "Limit the background copy (bytes/s, 0 = unlimited).")
        @Argument(help: "The mountpoint.") var mountpoint: String
        @Argument(help: "Bytes per second (0: unlimited); K/M/G/T, KiB..TiB, kB/MB/GB/TB.", transform: ByteCount.parse) var speed: ByteCount
        func run() throws {
            let client = try ControlClient(mountpoint: mountpoint)
            try client.execute("block-job-set-speed", [("device", .string(try client.requireJobID())), ("speed", .int(Int64(speed.bytes)))])
        }
    }
}
