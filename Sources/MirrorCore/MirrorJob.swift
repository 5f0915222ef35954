import Foundation
import Synchronization
import SystemPackage

/// A mirror job, after QEMU's MirrorBlockJob: one object holds the configuration, the
/// dirty and in-flight bitmaps, the counters and the state machine; `lock` guards all of
/// `state`. `copyMode` and `activelySynced` are atomics so the write path and queries
/// read them without the lock.
///
/// Threads: one job thread runs the main loop (`MirrorJob+Run.swift`), `maxInFlight`
/// copy workers perform background operations, and the filter's callers (FUSE workers)
/// run the write path (`MirrorJob+ActiveWrite.swift`). No lock is held across I/O.
public final class MirrorJob: @unchecked Sendable {
    /// QEMU's MAX_IN_FLIGHT: background operations at once.
    static let maxInFlight = 16
    /// QEMU's MAX_IO_BYTES: the largest single read or write of a copy.
    static let maxIOBytes: UInt64 = 1 << 20

    public let id: String
    public let options: MirrorOptions
    let source: any BlockDevice
    public let target: any BlockDevice
    /// When the job was created (monotonic seconds): job.json's `elapsed-seconds`.
    let startedAt: Double
    let size: UInt64
    /// Largest run of chunks one background operation takes.
    let maxRunBytes: UInt64

    /// Written by `change` (compare-and-swap) only; read by every write.
    let copyModeValue: Atomic<UInt8>
    /// True exactly when write-blocking, clean and nothing in background flight (set by the
    /// main loop); cleared by any error and any write not mirrored at once.
    let activelySyncedValue = Atomic<Bool>(false)

    /// The persistent dirty log, when the job has one.
    let log: DirtyLog?

    let lock = ConditionLock()
    /// Guarded by `lock`.
    var state: State

    /// Where events go (the filter: events.jsonl, QMP, the log), called with the job lock
    /// released: `emit` queues under the lock, `deliverEvents` hands the queue over after.
    let sink: @Sendable (JobEvent) -> Void
    /// Serializes delivery, so events leave in the order they were queued.
    let delivery = Mutex<Void>(())
    let lifecycle: @Sendable (Lifecycle) -> Void

    /// What the job tells the filter that serves the image, on the job thread.
    public enum Lifecycle: Sendable {
        /// The job lets go of the image's writes; `pivot`: serve the target from now on
        /// (the source is not touched again). `failed`: the job's dirty log, if any, must
        /// go on marking every write until it is discarded, so that a restart still copies
        /// them.
        case detach(pivot: Bool, failed: Bool)
        /// The job reached `null` and is gone from queries.
        case dismissed
    }

    struct State {
        var status: JobStatus = .undefined
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
        var speed: UInt64
        var ioStatus: IOStatus = .ok
        var userPaused = false
        var cancelRequested = false
        var forceCancelled = false
        var completeRequested = false
        var finalizeRequested = false
        var dismissRequested = false
        /// The first fatal error (QEMU's `ret`), as its message.
        var error: String?
        var becameReady = false
        var busy = true
        /// Filter writes between entry and exit; `drained` holds new ones back (completion).
        var filterWrites = 0
        /// Writes decided "not mirrored" that have not yet marked their range dirty:
        /// actively-synced waits for them (a write that saw background mode just before a
        /// switch to write-blocking).
        var unmirroredWrites = 0
        var drained = false
        /// The mount is ending: no new background work; the log records a clean stop.
        var shuttingDown = false
        /// Events queued under the lock, delivered after it is released.
        var outbox: [JobEvent] = []
        /// A cancel keeps the log (a mount that did not come up keeps what it resumed).
        var keepLog = false
        /// The job no longer sees writes: they go straight to the device the filter serves.
        var detached = false
        /// Background work queued for the copy workers, and whether they should exit.
        var queue: [CopyOperation] = []
        var workersExit = false
        var cursor = 0
        /// Token bucket for `speed` (bytes that may still be sent now; may go negative).
        var allowance: Double = 0
        var allowanceTime = monotonicNow()
        /// When the dirty log was last swept.
        var lastSweep = monotonicNow()
        /// After an ignored error, no new background work before this time.
        var retryAt: Double = 0
        var retryBackoff: Double = 0.05
    }

    struct CopyOperation {
        let chunks: Range<Int>
        let offset: UInt64
        let length: UInt64
    }

    public init(options: MirrorOptions, source: any BlockDevice, target: any BlockDevice,
                log: DirtyLog? = nil,
                emit: @escaping @Sendable (JobEvent) -> Void,
                lifecycle: @escaping @Sendable (Lifecycle) -> Void) throws(JobError) {
        self.log = log
        try options.validate()
        self.id = options.jobID
        self.options = options
        self.source = source
        self.target = target
        self.size = source.size
        self.startedAt = monotonicNow()
        let granularity = options.granularity
        let opBytes = max(options.bufSize / UInt64(Self.maxInFlight), Self.maxIOBytes)
        self.maxRunBytes = max(opBytes / granularity * granularity, granularity)
        self.copyModeValue = Atomic(options.copyMode == .background ? 0 : 1)
        self.state = State(dirty: ChunkBitmap(size: source.size, granularity: granularity),
                           inFlight: ChunkBitmap(size: source.size, granularity: granularity),
                           speed: options.speed)
        self.sink = emit
        self.lifecycle = lifecycle
    }

    public var copyMode: CopyMode {
        copyModeValue.load(ordering: .acquiring) == 0 ? .background : .writeBlocking
    }

    public var activelySynced: Bool { activelySyncedValue.load(ordering: .acquiring) }

    // MARK: - State machine

    /// Queues an event; it leaves after the lock is released (`deliverEvents`). Lock held.
    func emit(_ event: JobEvent) {
        state.outbox.append(event)
    }

    /// Hands queued events to the sink, in order. Lock not held.
    func deliverEvents() {
        delivery.withLock { _ in
            let events: [JobEvent] = lock.withLock {
                defer { state.outbox.removeAll() }
                return state.outbox
            }
            for event in events { sink(event) }
        }
    }

    /// The lock around `body`, then delivery of what it emitted.
    func locked<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        defer { deliverEvents() }
        return try lock.withLock(body)
    }

    /// Moves to `next` (QEMU's JobSTT) and emits JOB_STATUS_CHANGE when it differs. Lock held.
    func transition(to next: JobStatus) {
        let current = state.status
        precondition(current.allowedNext.contains(next), "job transition \(current) → \(next) is not allowed")
        state.status = next
        if next != current { emit(JobEvent(.statusChange(id: id, status: next))) }
        lock.broadcast()
    }

    /// The verb table check, with QEMU's message. Lock held.
    func checkVerb(_ verb: JobVerb) throws(JobError) {
        guard verb.allowedIn.contains(state.status) else {
            throw JobError("Job '\(id)' in state '\(state.status.rawValue)' cannot accept command verb '\(verb.rawValue)'")
        }
    }

    // MARK: - Verbs

    public func pause() throws(JobError) {
        try lock.withLock { () throws(JobError) in
            try checkVerb(.pause)
            guard !state.userPaused else { throw JobError("Job is already paused") }
            state.userPaused = true
            lock.broadcast()
        }
    }

    public func resume() throws(JobError) {
        try lock.withLock { () throws(JobError) in
            try checkVerb(.resume)
            guard state.userPaused else { throw JobError("Can't resume a job that was not paused") }
            state.userPaused = false
            state.ioStatus = .ok
            lock.broadcast()
        }
        target.retryNow()
    }

    /// Cancel. Before the job was ready, every cancel is forced; after, a soft cancel
    /// converges like complete but keeps serving the source.
    public func cancel(force: Bool) throws(JobError) {
        try lock.withLock { () throws(JobError) in
            try checkVerb(.cancel)
            if state.userPaused && !force {
                throw JobError("The block job for device '\(id)' is currently paused")
            }
            if force || !state.becameReady {
                state.forceCancelled = true
                state.userPaused = false
            } else {
                state.cancelRequested = true
            }
            lock.broadcast()
        }
    }

    public func complete() throws(JobError) {
        try lock.withLock { () throws(JobError) in
            try checkVerb(.complete)
            guard !state.cancelRequested && !state.forceCancelled else {
                throw JobError("The active block job '\(id)' cannot be completed")
            }
            state.completeRequested = true
            lock.broadcast()
        }
    }

    public func setSpeed(_ speed: Int64) throws(JobError) {
        try lock.withLock { () throws(JobError) in
            try checkVerb(.setSpeed)
            guard speed >= 0 else { throw JobError("Parameter 'speed' expects a non-negative value") }
            state.speed = UInt64(speed)
            lock.broadcast()
        }
    }

    /// block-job-change: only background → write-blocking is a change.
    public func change(copyMode newMode: CopyMode) throws(JobError) {
        try lock.withLock { () throws(JobError) in
            try checkVerb(.change)
            let current = copyMode
            if newMode == current { return }
            guard newMode == .writeBlocking else {
                throw JobError("Change to copy mode '\(newMode.rawValue)' is not implemented")
            }
            let (exchanged, original) = copyModeValue.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing)
            guard exchanged else {
                throw JobError("Expected current copy mode 'background', got '\(original == 0 ? "background" : "write-blocking")'")
            }
            lock.broadcast()
        }
    }

    public func finalize() throws(JobError) {
        try lock.withLock { () throws(JobError) in
            try checkVerb(.finalize)
            state.finalizeRequested = true
            lock.broadcast()
        }
    }

    public func dismiss() throws(JobError) {
        try lock.withLock { () throws(JobError) in
            try checkVerb(.dismiss)
            state.dismissRequested = true
            lock.broadcast()
        }
    }

    /// Stops the job at once, leaving its dirty log as it is: a mount that did not come
    /// up must not throw away the log it resumed.
    public func abandon() {
        lock.withLock { state.keepLog = true }
        try? cancel(force: true)
    }

    /// The mount ends: no new background copies; returns once those running are done,
    /// so nothing writes the target after the caller's last flush.
    public func stopForShutdown() {
        lock.withLock {
            state.shuttingDown = true
            lock.broadcast()
            while state.backgroundOps > 0 { lock.wait() }
        }
    }

    // MARK: - Queries

    public var status: JobStatus { lock.withLock { state.status } }

    public func info() -> BlockJobInfo {
        lock.withLock {
            let dirtyBytes = state.dirty.dirtyBytes
            let remaining = state.status == .concluded || state.status == .null
                ? 0 : dirtyBytes + state.bytesInFlight + state.activeBytesInFlight
            return BlockJobInfo(
                device: id, len: state.progressCurrent + remaining, offset: state.progressCurrent,
                busy: state.busy, paused: state.userPaused || state.status == .paused || state.status == .standby,
                speed: state.speed, ioStatus: state.ioStatus,
                ready: state.status == .ready || state.status == .standby, status: state.status,
                autoFinalize: options.autoFinalize, autoDismiss: options.autoDismiss, error: state.error,
                activelySynced: activelySynced, copyMode: copyMode, dirtyBytes: dirtyBytes,
                resyncBytes: options.resyncBytes, resyncReason: options.resyncReason,
                target: options.targetName, dirtyLog: log?.path,
                elapsedSeconds: ((monotonicNow() - startedAt) * 10).rounded() / 10)
        }
    }

    public func jobInfo() -> JobInfo {
        let block = info()
        return JobInfo(id: id, status: block.status, currentProgress: block.offset, totalProgress: block.len, error: block.error)
    }
}
