import Glibc
import SystemPackage

/// Everything about a mirror job that changes, as one value (after QEMU's MirrorBlockJob
/// and its Job): owned by the job's lock (`MirrorJob.state`), so only code inside the lock
/// can touch it. Its mutating methods are the job's transitions — verbs, the main loop's
/// step, copy completions, write arrivals, error decisions — and what must happen next
/// comes back as a value (`LoopStep`, `MirrorOp`, `Ending`, …) that the driver
/// (`MirrorJob`) carries out with the lock released. They take the time as an argument,
/// perform no I/O and take no lock. Events are queued in `outbox` and leave after unlock,
/// in order.
///
/// The files of the job follow mirror.c's steps: `MirrorJob+MainLoop.swift` (mirror_run),
/// `+Iteration` (mirror_iteration), `+CopyWorker` (mirror_perform … mirror_iteration_done),
/// `+ActiveWrite` (bdrv_mirror_top_do_write), `+Exit` (convergence, mirror_exit_common and
/// the job's finalize/conclude/dismiss).
struct MirrorState: Sendable {
    /// QEMU's MAX_IN_FLIGHT: background operations at once.
    static let maxInFlight = 16
    /// QEMU's MAX_IO_BYTES: the largest single read or write of a copy.
    static let maxIOBytes: UInt64 = 1 << 20
    /// QEMU's BLOCK_JOB_SLICE_TIME: the longest the main loop waits without looking.
    static let sliceTime: Double = 0.1

    // MARK: Configuration (fixed at creation)

    let id: String
    let options: MirrorOptions
    let size: UInt64
    /// Largest run of chunks one background operation takes.
    let maxRunChunks: Int
    /// The job keeps a persistent dirty log.
    let hasLog: Bool

    // MARK: Status (QEMU's JobStatus and its verb table)

    var status: JobStatus = .undefined
    var copyMode: CopyMode
    /// True exactly when write-blocking, clean and nothing in background flight (set by the
    /// main loop's step); cleared by any error and any write not mirrored at once.
    var activelySynced = false
    /// The job once reached ready (QEMU's `s->synced`): from then on, no rate limit, and
    /// a cancel converges instead of stopping at once.
    var synced = false
    var busy = true
    var speed: UInt64
    var ioStatus: IOStatus = .ok
    /// Paused by the user, or stopped by an error with policy `stop` (QEMU's user_paused).
    var userPaused = false
    /// What the job was asked to end with (QEMU: job->cancelled, force_cancel and
    /// s->should_complete), nil while no one asked.
    var pendingExit: PendingExit?
    /// The first fatal error (QEMU's `ret`), as its message.
    var error: String?
    /// A complete or soft cancel under way with a clean bitmap: new writes are held.
    var convergence: Convergence?
    /// How the main loop ended, once it has.
    var outcome: JobOutcome?
    /// The verb the job waits for after its loop (`finalize` without auto-finalize,
    /// `dismiss` without auto-dismiss); the verb clears it.
    var awaiting: JobVerb?
    /// The mount is ending: no new background work; the log records a clean stop.
    var shuttingDown = false

    // MARK: Dirty and in-flight tracking

    var dirty: ChunkBitmap
    var inFlight: ChunkBitmap
    /// Ranges of write-blocking writes waiting for their chunks; background runs avoid them
    /// so a stream of copies cannot starve a user's write.
    var waitingActive: [Range<Int>] = []
    var backgroundOps = 0
    var bytesInFlight: UInt64 = 0
    var activeBytesInFlight: UInt64 = 0
    var progressCurrent: UInt64 = 0
    var progressRemaining: UInt64 = 0
    /// Where the next iteration starts looking for dirty chunks.
    var cursor = 0
    /// Background work queued for the copy workers; `copiersExit`: they return.
    var queue: [CopyOperation] = []
    var copiersExit = false

    // MARK: The image's writes

    /// Whether writes may enter the job (`held` while it converges or lets go).
    var writeGate: WriteGate = .open
    /// Writes between entry and exit.
    var filterWrites = 0
    /// Writes waiting to enter or for their chunks (a settling write wakes them only then).
    var waitingWriters = 0
    /// Writes decided "not mirrored" that have not yet marked their range dirty:
    /// actively-synced waits for them (a write that saw background mode just before a
    /// switch to write-blocking).
    var unmirroredWrites = 0
    /// Background writes written through to the target and not yet reaped
    /// (`WriteThroughQueue`): they returned, so actively-synced waits for them.
    var writeThroughs = 0

    // MARK: Time

    /// Token bucket for `speed` (bytes that may still be sent now; may go negative).
    var allowance: Double = 0
    var allowanceTime: Double
    /// When the dirty log was last swept.
    var lastSweep: Double
    /// After an ignored error, no new background work (and no mirrored write) before this time.
    var retryAt: Double = 0
    var retryBackoff: Double = 0.05

    // MARK: Forecast (SPEC 10)

    /// When the job was created.
    let createdAt: Double
    /// User writes that dirtied clean chunks, and bytes written to the target.
    var dirtyWindow = RateWindow()
    var copyWindow = RateWindow()
    /// Since when a background job with `--auto-write-blocking` has not converged.
    var notConvergingSince: Double?

    /// Events queued under the lock, delivered after it is released.
    var outbox: [JobEvent] = []

    init(options: MirrorOptions, size: UInt64, hasLog: Bool, now: Double) {
        id = options.jobID
        self.options = options
        self.size = size
        self.hasLog = hasLog
        let granularity = options.granularity
        let opBytes = max(options.bufSize / UInt64(Self.maxInFlight), Self.maxIOBytes)
        maxRunChunks = Int(max(opBytes / granularity, 1))
        copyMode = options.copyMode
        speed = options.speed
        dirty = ChunkBitmap(size: size, granularity: granularity)
        inFlight = ChunkBitmap(size: size, granularity: granularity)
        allowanceTime = now
        lastSweep = now
        createdAt = now
    }

    // MARK: - Transitions

    /// Moves to `next` (QEMU's JobSTT) and queues JOB_STATUS_CHANGE when it differs.
    mutating func transition(to next: JobStatus) {
        let current = status
        precondition(current.allowedNext.contains(next), "job transition \(current) → \(next) is not allowed")
        status = next
        if next != current { emit(.statusChange(id: id, status: next)) }
    }

    mutating func emit(_ kind: JobEvent.Kind) {
        outbox.append(JobEvent(kind))
    }

    /// Marks a byte range dirty (the start's scan, a resumed log).
    mutating func markDirty(offset: UInt64, length: UInt64) {
        dirty.set(dirty.chunks(covering: offset, length: length))
    }

    /// A user's write dirtied `chunks`: those that were clean count in the dirty rate.
    mutating func userDirtied(_ chunks: Range<Int>, now: Double) {
        let before = dirty.dirtyChunks
        dirty.set(chunks)
        dirtyWindow.add(UInt64(dirty.dirtyChunks - before) * options.granularity, now: now)
    }

    // MARK: - Verbs (QEMU's JobVerbTable, then each verb's own checks)

    /// Runs a verb; a refused one changes nothing and throws QEMU's message.
    mutating func apply(_ request: VerbRequest) throws(JobError) -> VerbEffect {
        guard request.verb.allowedIn.contains(status) else {
            throw JobError("Job '\(id)' in state '\(status.rawValue)' cannot accept command verb '\(request.verb.rawValue)'")
        }
        switch request {
        case .pause:
            guard !userPaused else { throw JobError("Job is already paused") }
            userPaused = true
        case .resume:
            guard userPaused else { throw JobError("Can't resume a job that was not paused") }
            userPaused = false
            ioStatus = .ok
            return .retryTarget
        case .cancel(let force, let keepLog):
            if userPaused && !force { throw JobError("The block job for device '\(id)' is currently paused") }
            // Before ready every cancel is forced; after, a soft cancel converges like
            // complete but keeps serving the source.
            if force || !synced {
                // Once asked to keep the log (a mount that did not come up), it stays kept.
                pendingExit = .forceCancel(keepLog: keepLog || pendingExit == .forceCancel(keepLog: true))
                userPaused = false
            } else if pendingExit == nil {
                // (After complete, a soft cancel changes nothing: the job still pivots.)
                pendingExit = .cancel
            }
        case .complete:
            guard pendingExit == nil || pendingExit == .complete else {
                throw JobError("The active block job '\(id)' cannot be completed")
            }
            pendingExit = .complete
        case .setSpeed(let value):
            guard value >= 0 else { throw JobError("Parameter 'speed' expects a non-negative value") }
            speed = UInt64(value)
        case .change(let mode):
            // block-job-change: only background → write-blocking is a change.
            if mode == copyMode { return .none }
            guard mode == .writeBlocking else {
                throw JobError("Change to copy mode '\(mode.rawValue)' is not implemented")
            }
            copyMode = .writeBlocking
        case .finalize:
            if awaiting == .finalize { awaiting = nil }
        case .dismiss:
            if awaiting == .dismiss { awaiting = nil }
        }
        return .none
    }

    /// The mount ends: no new background copies.
    mutating func shutDown() {
        shuttingDown = true
    }

    // MARK: - Errors (mirror_error_action)

    /// Every error the job handles: actively-synced false, one BLOCK_JOB_ERROR, then the policy.
    mutating func errorAction(isRead: Bool, error errno: Errno, now: Double) {
        activelySynced = false
        let policy = isRead ? options.onSourceError : options.onTargetError
        emit(.error(device: id, operation: isRead ? "read" : "write", action: policy))
        switch policy {
        case .report:
            if error == nil { error = Self.message(for: errno) }
        case .ignore:
            // Retried by a later pass; back off so a persistent error does not spin.
            retryAt = now + retryBackoff
            retryBackoff = min(retryBackoff * 2, 1)
        case .stop:
            ioStatus = errno == .noSpace ? .nospace : .failed
            userPaused = true
        }
    }

    static func message(for error: Errno) -> String {
        String(cString: strerror(error.rawValue))
    }

    /// Whether writes should try the target now: not while the job is stopped by a target
    /// error or backing off after an ignored one, so that a dead target holds no user
    /// write more than once; those writes are tracked dirty instead.
    func targetUsable(now: Double) -> Bool {
        ioStatus == .ok && now >= retryAt
    }

    // MARK: - Queries

    func info(now: Double, dirtyLog: String?) -> BlockJobInfo {
        let elapsed = now - createdAt
        let dirtyBytes = dirty.dirtyBytes
        let remaining = status == .concluded || status == .null
            ? 0 : dirtyBytes + bytesInFlight + activeBytesInFlight
        return BlockJobInfo(
            device: id, len: progressCurrent + remaining, offset: progressCurrent,
            busy: busy, paused: userPaused || status == .paused || status == .standby,
            speed: speed, ioStatus: ioStatus,
            ready: status == .ready || status == .standby, status: status,
            autoFinalize: options.autoFinalize, autoDismiss: options.autoDismiss, error: error,
            activelySynced: activelySynced, copyMode: copyMode, dirtyBytes: dirtyBytes, forecast: forecast(now: now),
            resyncBytes: options.resyncBytes, resyncReason: options.resyncReason,
            target: options.targetName, dirtyLog: dirtyLog,
            elapsedSeconds: (elapsed * 10).rounded() / 10)
    }
}

/// Who waits on which of the job lock's condition variables, so that a change wakes only
/// those who wait for it (a write's settle used to wake all sixteen copy workers).
enum Wake: Int, CaseIterable, Sendable {
    /// The job thread (its loop, its exit), the mount's shutdown, `MirrorJob.wait(until:)`.
    case job
    /// The copy workers, waiting for queued work.
    case copiers
    /// Writes held at the gate or waiting for their chunks.
    case writers
}

/// A verb with its arguments, as QMP and the CLI ask for it.
enum VerbRequest: Sendable, Equatable {
    case pause, resume
    /// `keepLog`: the job's dirty log stays as it is (a mount that did not come up must
    /// not throw away the log it resumed).
    case cancel(force: Bool, keepLog: Bool = false)
    case complete
    case setSpeed(Int64)
    case change(CopyMode)
    case finalize, dismiss

    var verb: JobVerb {
        switch self {
        case .pause: .pause
        case .resume: .resume
        case .cancel: .cancel
        case .complete: .complete
        case .setSpeed: .setSpeed
        case .change: .change
        case .finalize: .finalize
        case .dismiss: .dismiss
        }
    }
}

/// What a verb leaves to the driver.
enum VerbEffect: Sendable, Equatable {
    case none
    /// Resumed: a target that dropped its connection may try again at once.
    case retryTarget
}

/// How the job was asked to end.
enum PendingExit: Sendable, Equatable {
    /// block-job-complete: converge, then serve the target.
    case complete
    /// A cancel after ready: converge, keep serving the source; the target is a consistent copy.
    case cancel
    /// Stop at once (any cancel before ready, or `force`).
    case forceCancel(keepLog: Bool)

    var isForced: Bool {
        if case .forceCancel = self { return true }
        return false
    }
}

/// A convergence (complete or soft cancel, bitmap clean), step by step; writes are held throughout.
enum Convergence: Sendable, Equatable {
    /// Waiting for the writes inside the job to finish.
    case draining
    /// The target is flushed; a completion is recorded next when there is a log.
    case flushed
    /// The completion is durable in the log: the job must pivot now.
    case recorded
}

/// Whether the image's writes may enter the job.
enum WriteGate: Sendable, Equatable {
    case open
    /// New writes wait (convergence, letting go).
    case held
    /// The job let go: writes go to the device the filter serves.
    case closed
}

/// How the main loop ended.
enum JobOutcome: Sendable, Equatable {
    case converged
    case failed(String)
    case cancelled
}

/// One background copy: a run of dirty chunks.
struct CopyOperation: Sendable, Equatable {
    let chunks: Range<Int>
    let offset: UInt64
    let length: UInt64
}
