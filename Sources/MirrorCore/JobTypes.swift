/// QAPI enums of a mirror job, with QEMU's wire names.

/// QEMU's rule for downstream extensions: names start with `__RFQDN_`.
public enum QAPIExtension {
    public static let prefix = "__org.mirrorfs_"
}

/// MirrorCopyMode.
public enum CopyMode: String, Sendable, CaseIterable, Codable {
    case background
    case writeBlocking = "write-blocking"
}

/// MirrorSyncMode (the subset a raw image without backing file supports).
public enum SyncMode: String, Sendable, CaseIterable, Codable {
    case full
    case none
}

/// BlockdevOnError (the actions a mirror honours).
public enum ErrorPolicy: String, Sendable, CaseIterable, Codable {
    case report
    case ignore
    case stop
}

/// BlockDeviceIoStatus.
public enum IOStatus: String, Sendable {
    case ok
    case failed
    case nospace
}

/// JobStatus. `undefined` is never visible.
public enum JobStatus: String, Sendable, CaseIterable {
    case undefined, created, running, paused, ready, standby, waiting, pending, aborting, concluded
    case null

    /// QEMU's JobSTT: the transitions allowed from each state.
    public var allowedNext: Set<JobStatus> {
        switch self {
        case .undefined: [.created]
        case .created: [.running, .aborting, .null]
        case .running: [.paused, .ready, .waiting, .aborting]
        case .paused: [.running]
        case .ready: [.standby, .waiting, .aborting]
        case .standby: [.ready]
        case .waiting: [.pending, .aborting]
        case .pending: [.aborting, .concluded]
        case .aborting: [.aborting, .concluded]
        case .concluded: [.null]
        case .null: []
        }
    }
}

/// JobVerb, with QEMU's JobVerbTable.
public enum JobVerb: String, Sendable, CaseIterable {
    case cancel, pause, resume
    case setSpeed = "set-speed"
    case complete, dismiss, finalize, change

    public var allowedIn: Set<JobStatus> {
        switch self {
        case .cancel: [.created, .running, .paused, .ready, .standby, .waiting, .pending]
        case .pause, .resume, .setSpeed, .change: [.created, .running, .paused, .ready, .standby]
        case .complete: [.ready, .standby]
        case .finalize: [.pending]
        case .dismiss: [.concluded]
        }
    }
}

/// A refused verb or a bad argument, with QEMU's error text (QMP class GenericError).
public struct JobError: Error, Sendable, Equatable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Everything a mirror job is started with.
public struct MirrorOptions: Sendable, Codable {
    public var jobID: String
    public var copyMode: CopyMode = .background
    public var sync: SyncMode = .full
    public var granularity: UInt64 = 64 << 10
    public var bufSize: UInt64 = 16 << 20
    public var speed: UInt64 = 0
    public var onSourceError: ErrorPolicy = .report
    public var onTargetError: ErrorPolicy = .report
    public var autoFinalize = true
    public var autoDismiss = true
    /// The target reads as zeroes everywhere (it was just created sparse): source holes
    /// need not be copied.
    public var targetIsZero = false
    /// Resume after a crash: only the regions the dirty log marks are copied.
    public var resumeFromLog = false
    /// Reported as `resync-bytes`: what a restart had to copy again (nil for a new job).
    public var resyncBytes: UInt64?
    /// Reported as `resync-reason`: why a restart copies what it copies.
    public var resyncReason: String?
    /// The target as given (path or URI), reported as `target`.
    public var targetName: String?
    /// `--auto-write-blocking`: seconds a background job may go without converging before
    /// it switches itself to write-blocking (nil: never).
    public var autoWriteBlockingAfter: Double?
    /// The ranges (offset, length pairs) a previous server had not yet copied when it handed
    /// the job over cleanly; used only with a log whose record says it stopped cleanly.
    public var handOverRanges: [UInt64]?
    public static let defaultAutoWriteBlockingAfter: Double = 10

    public init(jobID: String) { self.jobID = jobID }

    /// QEMU's start-time checks, with its messages.
    public func validate() throws(JobError) {
        if granularity < 512 || granularity > 64 << 20 {
            throw JobError("Parameter 'granularity' expects a value in range [512B, 64MB]")
        }
        if granularity.nonzeroBitCount != 1 { throw JobError("Parameter 'granularity' expects a power of 2") }
    }

    /// QEMU's rule for an explicit job ID: a letter, then letters, digits, '-', '_' or '.'.
    public static func validate(jobID: String) throws(JobError) {
        if jobID.isEmpty || !jobID.first!.isLetter
            || !jobID.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }) {
            throw JobError("Invalid job ID '\(jobID)'")
        }
    }
}
