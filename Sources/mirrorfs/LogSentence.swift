import Foundation
import MirrorCore

/// The daemon's log speaks in sentences a person reads: what the job did, what it means,
/// and what to do next. (events.jsonl and QMP keep the events as QEMU writes them.)
enum LogSentence {
    static func describe(_ event: JobEvent, mountpoint: String) -> String? {
        switch event.kind {
        case let .statusChange(id, status):
            switch status {
            case .created: return nil
            case .running: return "job '\(id)' is running"
            case .paused: return "job '\(id)' is paused"
            case .ready: return nil  // BLOCK_JOB_READY says more
            case .standby: return "job '\(id)' is paused while ready"
            case .waiting, .pending: return nil
            case .aborting: return "job '\(id)' is ending without a pivot"
            case .concluded: return "job '\(id)' has concluded"
            case .null: return "job '\(id)' is gone"
            case .undefined: return nil
            }
        case let .ready(device, len, _, _):
            return "job '\(device)' is ready: the target holds every byte of the image (\(len) bytes copied so far); 'mirrorfs job complete \(mountpoint)' pivots"
        case let .completed(device, _, _, _, error?):
            return "job '\(device)' failed: \(error)"
        case let .completed(device, _, offset, _, nil):
            return "job '\(device)' completed after copying \(offset) bytes"
        case let .cancelled(device, _, offset, _):
            return "job '\(device)' was cancelled after copying \(offset) bytes"
        case let .error(device, operation, action):
            let side = operation == "read" ? "reading the source" : "writing the target"
            let then = switch action {
            case .report: "the job fails"
            case .ignore: "the job retries the range"
            case .stop: "the job stops until 'mirrorfs job resume \(mountpoint)'"
            }
            return "job '\(device)': an I/O error \(side); \(then) (on-\(operation == "read" ? "source" : "target")-error \(action.rawValue))"
        case .pending:
            return nil
        case let .serverRestart(restarts, cause, pid):
            return "a new server (pid \(pid)) took the mount over after \(cause) (restart \(restarts)); requests in flight were sent again"
        case let .autoWriteBlocking(device, seconds, dirtyRate, copyRate):
            return "job '\(device)' did not converge for \(Int(seconds)) s (writes dirtied \(dirtyRate) bytes/s, the copy made \(copyRate) bytes/s): it switched itself to write-blocking (--auto-write-blocking); from now on every write reaches the target before it is acknowledged"
        }
    }

    static func describe(_ detach: JobDetach, mountpoint: String, image: String) -> String {
        if detach.pivoted {
            return "pivoted: \(mountpoint)/\(image) now serves \(detach.serving); the old source is no longer used"
        }
        if detach.failed {
            return "job '\(detach.job)' let go of its target \(detach.target) after a failure; \(mountpoint)/\(image) still serves \(detach.serving)"
        }
        return "job '\(detach.job)' let go of its target \(detach.target); \(mountpoint)/\(image) still serves \(detach.serving)"
    }
}

/// The line `systemctl status` shows (sd_notify STATUS=).
enum ServiceStatus {
    static func describe(_ filter: MirrorFilter, image: String) -> String {
        guard let job = filter.job?.info() else { return "serving \(image) from \(filter.device.location); no job" }
        var text = "serving \(image); job \(job.device) \(job.status.rawValue), \(job.copyMode.rawValue)"
        if job.activelySynced { text += ", actively synced" }
        if let target = job.target { text += ", to \(target)" }
        return text
    }
}
