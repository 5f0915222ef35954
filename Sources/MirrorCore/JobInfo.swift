import Foundation

/// BlockJobInfo for a mirror job, as query-block-jobs returns it. `.status/job.json` and QMP
/// share this one type and its one wire form, `jsonValue` (QAPI names, QEMU's member order).
public struct BlockJobInfo: Sendable, Equatable {
    public var type = "mirror"
    public var device: String
    public var len: UInt64
    public var offset: UInt64
    public var busy: Bool
    public var paused: Bool
    public var speed: UInt64
    public var ioStatus: IOStatus
    public var ready: Bool
    public var status: JobStatus
    public var autoFinalize: Bool
    public var autoDismiss: Bool
    public var error: String?
    public var activelySynced: Bool
    // Members beyond QEMU's:
    public var copyMode: CopyMode
    public var dirtyBytes: UInt64
    /// SPEC 10's forecast: `dirty-rate`, `copy-rate`, `converging`, `eta-seconds`.
    public var forecast = JobForecast(dirtyRate: 0, copyRate: 0, converging: false, etaSeconds: nil)
    public var resyncBytes: UInt64?
    public var resyncReason: String?
    public var target: String?
    public var dirtyLog: String?
    /// Seconds since the job started (one decimal).
    public var elapsedSeconds: Double = 0
}

extension BlockJobInfo {
    /// The object in QEMU's member order.
    public var jsonValue: JSONValue {
        var members: [(String, JSONValue)] = [
            ("type", .string(type)), ("device", .string(device)), ("len", .int(Int64(len))),
            ("offset", .int(Int64(offset))), ("busy", .bool(busy)), ("paused", .bool(paused)),
            ("speed", .int(Int64(speed))), ("io-status", .string(ioStatus.rawValue)), ("ready", .bool(ready)),
            ("status", .string(status.rawValue)), ("auto-finalize", .bool(autoFinalize)),
            ("auto-dismiss", .bool(autoDismiss)),
        ]
        if let error { members.append(("error", .string(error))) }
        members += [("actively-synced", .bool(activelySynced)), ("copy-mode", .string(copyMode.rawValue)),
                    ("dirty-bytes", .int(Int64(dirtyBytes))),
                    ("dirty-rate", .int(Int64(forecast.dirtyRate.rounded()))), ("copy-rate", .int(Int64(forecast.copyRate.rounded()))),
                    ("eta-seconds", forecast.etaSeconds.map { .double(($0 * 10).rounded() / 10) } ?? .null),
                    ("converging", .bool(forecast.converging))]
        if let resyncBytes { members.append(("resync-bytes", .int(Int64(resyncBytes)))) }
        if let resyncReason { members.append(("resync-reason", .string(resyncReason))) }
        members.append(("elapsed-seconds", .double(elapsedSeconds)))
        if let target { members.append(("target", .string(target))) }
        members.append(("dirty-log", dirtyLog.map { .string($0) } ?? .null))
        return .object(members)
    }

    public var jsonText: String { jsonValue.compactText }
}

extension JobInfo {
    public var jsonValue: JSONValue {
        var members: [(String, JSONValue)] = [
            ("id", .string(id)), ("type", .string(type)), ("status", .string(status.rawValue)),
            ("current-progress", .int(Int64(currentProgress))), ("total-progress", .int(Int64(totalProgress))),
        ]
        if let error { members.append(("error", .string(error))) }
        return .object(members)
    }
}

/// JobInfo, as query-jobs returns it.
public struct JobInfo: Sendable, Equatable {
    public var id: String
    public var type = "mirror"
    public var status: JobStatus
    public var currentProgress: UInt64
    public var totalProgress: UInt64
    public var error: String?

}

/// A QMP event: `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}`.
public struct JobEvent: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case statusChange(id: String, status: JobStatus)
        case ready(device: String, len: UInt64, offset: UInt64, speed: UInt64)
        case completed(device: String, len: UInt64, offset: UInt64, speed: UInt64, error: String?)
        case cancelled(device: String, len: UInt64, offset: UInt64, speed: UInt64)
        case error(device: String, operation: String, action: ErrorPolicy)
        case pending(id: String)
        /// `--auto-write-blocking` switched a job that did not converge (a downstream
        /// extension event, named by QEMU's rule for them).
        case autoWriteBlocking(device: String, seconds: Double, dirtyRate: UInt64, copyRate: UInt64)
        /// A new server took the mount's connection over (SPEC 11; a downstream extension event).
        case serverRestart(restarts: Int, cause: String, pid: Int32)
    }

    public let kind: Kind
    public let seconds: Int
    public let microseconds: Int

    public init(_ kind: Kind, at time: Date = Date()) {
        self.kind = kind
        let t = time.timeIntervalSince1970
        seconds = Int(t)
        microseconds = Int((t - Double(Int(t))) * 1e6)
    }

    public var name: String {
        switch kind {
        case .statusChange: "JOB_STATUS_CHANGE"
        case .ready: "BLOCK_JOB_READY"
        case .completed: "BLOCK_JOB_COMPLETED"
        case .cancelled: "BLOCK_JOB_CANCELLED"
        case .error: "BLOCK_JOB_ERROR"
        case .pending: "BLOCK_JOB_PENDING"
        case .autoWriteBlocking: QAPIExtension.prefix + "BLOCK_JOB_AUTO_WRITE_BLOCKING"
        case .serverRestart: QAPIExtension.prefix + "SERVER_RESTART"
        }
    }

    /// The event's `data` member, with QEMU's member names.
    public var data: JSONValue {
        func progress(_ device: String, _ len: UInt64, _ offset: UInt64, _ speed: UInt64) -> [(String, JSONValue)] {
            [("type", "mirror"), ("device", .string(device)), ("len", .int(Int64(len))),
             ("offset", .int(Int64(offset))), ("speed", .int(Int64(speed)))]
        }
        switch kind {
        case let .statusChange(id, status):
            return .object([("id", .string(id)), ("status", .string(status.rawValue))])
        case let .ready(device, len, offset, speed):
            return .object(progress(device, len, offset, speed))
        case let .completed(device, len, offset, speed, error):
            return .object(progress(device, len, offset, speed) + (error.map { [("error", .string($0))] } ?? []))
        case let .cancelled(device, len, offset, speed):
            return .object(progress(device, len, offset, speed))
        case let .error(device, operation, action):
            return .object([("device", .string(device)), ("operation", .string(operation)), ("action", .string(action.rawValue))])
        case let .pending(id):
            return .object([("type", "mirror"), ("id", .string(id))])
        case let .autoWriteBlocking(device, seconds, dirtyRate, copyRate):
            return .object([("type", "mirror"), ("device", .string(device)), ("copy-mode", "write-blocking"),
                            ("not-converging-seconds", .double(seconds)), ("dirty-rate", .int(Int64(dirtyRate))),
                            ("copy-rate", .int(Int64(copyRate)))])
        case let .serverRestart(restarts, cause, pid):
            return .object([("restarts", .int(Int64(restarts))), ("cause", .string(cause)), ("pid", .int(Int64(pid)))])
        }
    }

    /// The whole QMP event object.
    public var jsonValue: JSONValue {
        .object([("event", .string(name)), ("data", data),
                 ("timestamp", .object([("seconds", .int(Int64(seconds))), ("microseconds", .int(Int64(microseconds)))]))])
    }

    /// One compact JSON line.
    public var jsonLine: String { jsonValue.compactText }
}

