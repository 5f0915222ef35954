import Foundation
import Synchronization
import SystemPackage

/// A mirror job, after QEMU's MirrorBlockJob: the driver of one `MirrorState`. The state
/// is a value owned by `state` (a lock with one condition variable); its transitions
/// return what must happen next, and the driver carries that out with the lock released:
/// I/O on source and target, the dirty log, the filter's callbacks, the events.
///
/// Threads: one job thread runs the main loop (`MirrorJob+MainLoop.swift`), `maxInFlight`
/// copy workers perform background operations (`+CopyWorker`), and the filter's callers
/// (FUSE workers) run the write path (`+ActiveWrite`). No lock is held across I/O, and no
/// listener runs with the lock held.
public final class MirrorJob: Sendable {
    public let id: String
    public let options: MirrorOptions
    let source: any BlockDevice
    public let target: any BlockDevice
    let size: UInt64
    /// The persistent dirty log, when the job has one.
    let log: DirtyLog?
    let clock: any JobClock
    /// Background writes through to the target after ready, when the target takes
    /// asynchronous writes (an O_DIRECT file).
    let writeThroughQueue: WriteThroughQueue?

    /// Everything that changes. Broadcast after a change someone may wait for.
    let state: ConditionLock<MirrorState>

    /// Where events go (the filter: events.jsonl, QMP, the log), called with the lock
    /// released: transitions queue them in `MirrorState.outbox`, `deliverEvents` hands the
    /// queue over after.
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

    public init(options: MirrorOptions, source: any BlockDevice, target: any BlockDevice,
                log: DirtyLog? = nil, clock: any JobClock = MonotonicClock(),
                emit: @escaping @Sendable (JobEvent) -> Void,
                lifecycle: @escaping @Sendable (Lifecycle) -> Void) throws(JobError) {
        try options.validate()
        self.id = options.jobID
        self.options = options
        self.source = source
        self.target = target
        self.size = source.size
        self.log = log
        self.clock = clock
        self.state = ConditionLock(MirrorState(options: options, size: source.size, hasLog: log != nil, now: clock.now()),
                                   conditions: Wake.allCases.count)
        self.sink = emit
        self.lifecycle = lifecycle
        writeThroughQueue = target.size >= 4096 && target.asynchronousWriteDescriptor(offset: 0, count: 4096, cache: .direct) != nil
            ? WriteThroughQueue() : nil
    }

    // MARK: - Locked sections

    /// `body` under the lock, then a broadcast to those who may wait for the change (all,
    /// unless the caller knows better) and the delivery of the events it queued.
    @discardableResult
    func locked<R, E: Error>(wake: [Wake] = Wake.allCases, _ body: (inout MirrorState) throws(E) -> R) throws(E) -> R {
        defer {
            self.wake(wake)
            deliverEvents()
        }
        return try state.withLock(body)
    }

    func wake(_ waiters: [Wake]) {
        for waiter in waiters { state.broadcast(waiter.rawValue) }
    }

    /// Hands queued events to the sink, in order. Lock not held.
    func deliverEvents() {
        delivery.withLock { _ in
            let events: [JobEvent] = state.withLock { s in
                defer { s.outbox.removeAll() }
                return s.outbox
            }
            for event in events { sink(event) }
        }
    }

    // MARK: - Verbs

    public func pause() throws(JobError) { try apply(.pause) }
    public func resume() throws(JobError) { try apply(.resume) }
    /// Cancel. Before the job was ready, every cancel is forced; after, a soft cancel
    /// converges like complete but keeps serving the source.
    public func cancel(force: Bool) throws(JobError) { try apply(.cancel(force: force)) }
    public func complete() throws(JobError) { try apply(.complete) }
    public func setSpeed(_ speed: Int64) throws(JobError) { try apply(.setSpeed(speed)) }
    /// block-job-change: only background → write-blocking is a change.
    public func change(copyMode: CopyMode) throws(JobError) { try apply(.change(copyMode)) }
    public func finalize() throws(JobError) { try apply(.finalize) }
    public func dismiss() throws(JobError) { try apply(.dismiss) }

    /// Stops the job at once, leaving its dirty log as it is: a mount that did not come
    /// up must not throw away the log it resumed.
    public func abandon() { try? apply(.cancel(force: true, keepLog: true)) }

    private func apply(_ request: VerbRequest) throws(JobError) {
        var effect = VerbEffect.none
        defer {
            // A resumed target may reconnect at once, before the wake lets any copy or
            // write reach it (and before the events' listeners, which may be slow).
            if effect == .retryTarget { target.retryNow() }
            wake(Wake.allCases)
            deliverEvents()
        }
        effect = try state.withLock { (s) throws(JobError) in try s.apply(request) }
    }

    /// The mount ends: no new background copies; returns once those running (and the
    /// writes through to the target) are done, so nothing writes the target after the
    /// caller's last flush.
    public func stopForShutdown() {
        locked { $0.shutDown() }
        state.withLock(waiting: { s in s.backgroundOps > 0 || s.writeThroughs > 0 ? .wait(timeout: nil) : .done(()) })
    }

    /// After `stopForShutdown`: every range the target may still lack (dirty or in flight),
    /// as offset/length pairs, for the server that takes the job over.
    public func unsyncedRanges() -> [UInt64] {
        state.withLock { s in
            var pairs: [UInt64] = []
            var chunk = 0
            let granularity = s.dirty.granularity
            while chunk < s.dirty.chunkCount {
                guard s.dirty.isDirty(chunk) || s.inFlight.isDirty(chunk) else { chunk += 1; continue }
                let first = chunk
                while chunk < s.dirty.chunkCount && (s.dirty.isDirty(chunk) || s.inFlight.isDirty(chunk)) { chunk += 1 }
                let offset = UInt64(first) * granularity
                pairs += [offset, min(UInt64(chunk) * granularity, size) - offset]
            }
            return pairs
        }
    }

    // MARK: - Queries

    public var status: JobStatus { state.withLock { $0.status } }
    public var copyMode: CopyMode { state.withLock { $0.copyMode } }
    public var activelySynced: Bool { state.withLock { $0.activelySynced } }

    public func info() -> BlockJobInfo {
        let now = clock.now()
        return state.withLock { $0.info(now: now, dirtyLog: log?.path) }
    }

    public func jobInfo() -> JobInfo {
        let block = info()
        return JobInfo(id: id, status: block.status, currentProgress: block.offset, totalProgress: block.len, error: block.error)
    }

    /// Waits until `condition` holds for the job's state or `timeout` seconds pass; true
    /// when it holds. Every change someone may wait for broadcasts, so this does not poll.
    public func wait(timeout: Double, until condition: (BlockJobInfo) -> Bool) -> Bool {
        let deadline = monotonicNow() + timeout
        return state.withLock(waiting: { s in
            if condition(s.info(now: clock.now(), dirtyLog: log?.path)) { return .done(true) }
            let left = deadline - monotonicNow()
            return left > 0 ? .wait(timeout: left) : .done(false)
        })
    }
}
