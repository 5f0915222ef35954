import Glibc
import Synchronization
import SystemPackage

/// How a client asked to change a range's allocation (fallocate(2) modes the image supports).
public enum AllocationChange: Sendable, Equatable {
    /// PUNCH_HOLE|KEEP_SIZE: deallocate; reads return zeroes.
    case punchHole
    /// ZERO_RANGE: zeroes, allocated.
    case zeroRange
    /// Mode 0 or KEEP_SIZE: preallocate, contents unchanged.
    case preallocate
}

/// A job that stopped seeing writes: pivoted onto its target, failed, or cancelled.
public struct JobDetach: Sendable {
    public let job: String
    public let target: String
    public let pivoted: Bool
    public let failed: Bool
    /// Where the image is served from now.
    public let serving: String
}

/// Every request on the image passes through here, as every request of a QEMU guest
/// passes through the mirror_top filter. It enforces the image's fixed size and
/// read-only flag, then forwards to the device the image is served from — through the
/// mirror job's write path while a job runs. After a pivot it serves the target.
public final class MirrorFilter: Sendable {
    public let isReadOnly: Bool
    public let events: EventLog
    public let size: UInt64
    /// Called for every event after it is logged (the QMP server's broadcast).
    private let eventListeners = Mutex<[@Sendable (JobEvent) -> Void]>([])
    /// Called when a job stops seeing writes: how it ended, and the device served after.
    private let detachListeners = Mutex<[@Sendable (JobDetach) -> Void]>([])
    private let pivotListeners = Mutex<[@Sendable (any BlockDevice) -> Void]>([])

    private struct Routing {
        /// The device the image is served from: the source, or the target after a pivot.
        var device: any BlockDevice
        /// The job that sees writes; nil when none runs or it has let go.
        var writer: MirrorJob?
        /// The job queries show, until it reaches `null`.
        var visible: MirrorJob?
        /// A failed job whose dirty log every write marks until a new job takes it over or
        /// it is discarded: a restart copies what was written after the failure too.
        var failedJob: MirrorJob?
        /// The failed job's target as it was let go: a job that takes the log over needs it unchanged.
        var failedJobTargetStamp: ChangeStamp?
    }
    /// Writes on their way to a device without a job (they read `writer == nil`): a job
    /// that starts waits for them, as QEMU drains before inserting its filter, so no
    /// write lands unseen after the job's first scan.
    private let unmirroredWrites = Atomic<Int>(0)
    /// Writes (and hole punches) the mount has served since it began: a dirty log that did
    /// not see every one of them cannot vouch for a target (`DirtyLog.marks`).
    private let writesServed = Atomic<Int>(0)

    public var servedWrites: Int { writesServed.load(ordering: .sequentiallyConsistent) }
    /// Leaf lock, taken per request only to read the routing; never held across I/O.
    private let routing: Mutex<Routing>

    public init(source: any BlockDevice, readOnly: Bool, events: EventLog = EventLog()) {
        self.isReadOnly = readOnly || ((source as? FileBlockDevice)?.isReadOnly ?? false)
        self.events = events
        self.size = source.size
        self.routing = Mutex(Routing(device: source))
    }

    /// The device reads and writes go to now.
    public var device: any BlockDevice { routing.withLock { $0.device } }

    /// The job queries show, if any.
    public var job: MirrorJob? { routing.withLock { $0.visible } }

    public func addEventListener(_ listener: @escaping @Sendable (JobEvent) -> Void) {
        eventListeners.withLock { $0.append(listener) }
    }

    /// Called on the job's thread just before a pivot takes effect (the completion is
    /// recorded, writes are held): the device that will be served.
    public func addPivotListener(_ listener: @escaping @Sendable (any BlockDevice) -> Void) {
        pivotListeners.withLock { $0.append(listener) }
    }

    /// An event that is not a job's (a server restart): logged and sent as job events are.
    public func emit(_ event: JobEvent) { record(event) }

    public func addDetachListener(_ listener: @escaping @Sendable (JobDetach) -> Void) {
        detachListeners.withLock { $0.append(listener) }
    }

    // MARK: - Jobs

    /// Starts a mirror of the image to `target` (one job at a time, as one device has one
    /// mirror in QEMU). A failed job's log that `log` is not is discarded: the new job
    /// replaces it.
    @discardableResult
    public func startMirror(to target: any BlockDevice, options: MirrorOptions, log: DirtyLog? = nil) throws(JobError) -> MirrorJob {
        guard !isReadOnly else { throw JobError("Block node is read-only") }
        let job = try MirrorJob(
            options: options, source: device, target: target, log: log,
            emit: { [weak self] event in self?.record(event) },
            lifecycle: { [weak self] change in self?.jobChanged(change) })
        let replaced = try routing.withLock { (r: inout Routing) throws(JobError) -> DirtyLog? in
            if let current = r.visible {
                throw JobError("Job ID '\(current.id)' already in use")
            }
            r.writer = job
            r.visible = job
            defer { r.failedJob = nil }
            return r.failedJob?.log
        }
        // Drain: writes that missed the job finish before it scans or reads its log.
        while unmirroredWrites.load(ordering: .sequentiallyConsistent) > 0 { usleep(100) }
        // (A new log at the same path has replaced the file already: nothing to remove.)
        if let replaced, replaced !== log, replaced.path != log?.path { replaced.retire() }
        job.start()
        return job
    }

    /// The dirty log a failed job left marking, if any.
    public var failedJobLog: DirtyLog? { routing.withLock { $0.failedJob?.log } }

    /// The failed job's target's change stamp when the job let go of it.
    public var failedJobTargetStamp: ChangeStamp? { routing.withLock { $0.failedJobTargetStamp } }

    /// Discards a failed job's log (`job cancel` after the failure); returns it.
    public func discardFailedJobLog() -> DirtyLog? {
        let log = routing.withLock { r in
            defer { r.failedJob = nil }
            return r.failedJob?.log
        }
        while unmirroredWrites.load(ordering: .sequentiallyConsistent) > 0 { usleep(100) }
        log?.retire()
        return log
    }

    /// The mount ends (no request can arrive any more): background copies stop, source
    /// and target are flushed, and a job's log — running or failed — records a clean stop
    /// with both images' change stamps, so a restart that finds either changed copies all.
    public func close() {
        let (writer, failed) = routing.withLock { ($0.writer, $0.failedJob) }
        writer?.stopForShutdown()
        try? device.flush(dataOnly: false)
        guard let job = writer ?? failed, let log = job.log, log.record == .mirroring else { return }
        _ = try? job.target.flush(dataOnly: false)
        // An NBD export has no stamp (0): only the source's is checked then.
        if let sourceStamp = device.changeStamp {
            try? log.setRecord(.stopped(source: sourceStamp, target: job.target.changeStamp ?? ChangeStamp(nanoseconds: 0)))
        }
    }

    private func record(_ event: JobEvent) {
        events.append(event.jsonLine)
        for listener in eventListeners.withLock({ $0 }) { listener(event) }
    }

    private func jobChanged(_ change: MirrorJob.Lifecycle) {
        if case .detach(pivot: true, _) = change, let target = routing.withLock({ $0.writer?.target }) {
            for listener in pivotListeners.withLock({ $0 }) { listener(target) }
        }
        let detached = routing.withLock { r -> JobDetach? in
            switch change {
            case .detach(let pivot, let failed):
                guard let job = r.writer else { return nil }
                if pivot {
                    // The old source is let go, as QEMU drops it after the pivot.
                    (r.device as? FileBlockDevice)?.unlock()
                    r.device = job.target
                } else {
                    // So is a target no longer written: another user (or job) may take it.
                    (job.target as? FileBlockDevice)?.unlock()
                }
                if failed, job.log != nil {
                    r.failedJob = job
                    r.failedJobTargetStamp = job.target.changeStamp
                } else {
                    r.failedJob = nil
                }
                r.writer = nil
                return JobDetach(job: job.id, target: job.target.location, pivoted: pivot, failed: failed,
                                 serving: r.device.location)
            case .dismissed:
                r.visible = nil
                return nil
            }
        }
        guard let detached else { return }
        for listener in detachListeners.withLock({ $0 }) { listener(detached) }
    }

    // MARK: - I/O

    /// Reads at `offset`; fewer bytes than asked only at the end of the image.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) -> Int {
        try device.read(into: buffer, at: offset, cache: cache)
    }

    /// Writes at `offset`, cut at the end of the image: returns the bytes written,
    /// ENOSPC when none fit (the image never grows).
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) -> Int {
        var written = 0
        try write(buffer, at: offset, cache: cache) { written = $0 }
        return written
    }

    /// `write`, answering through `reply` (the bytes written), called once when the write
    /// succeeded; a failure is thrown instead. Work that the user need not wait for (a
    /// background write through to the target) runs after `reply`, before this returns.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy,
                      reply: (Int) -> Void) throws(Errno) {
        guard !isReadOnly else { throw .readOnlyFileSystem }
        guard !buffer.isEmpty else { return reply(0) }
        guard offset < size else { throw .noSpace }
        let count = Int(min(UInt64(buffer.count), size - offset))
        var replied = false
        try route(.data(UnsafeRawBufferPointer(rebasing: buffer[0..<count])), at: offset, cache: cache) {
            replied = true
            reply(count)
        }
        if !replied { reply(count) }
    }

    /// Sends a write to the job while one sees writes, else straight to the device.
    /// `written`: the job may call it once the write is on the source and nothing it still
    /// does can fail the write (the caller then replies at once).
    private func route(_ write: ImageWrite, at offset: UInt64, cache: CachePolicy,
                       written: () -> Void = {}) throws(Errno) {
        writesServed.add(1, ordering: .sequentiallyConsistent)
        while true {
            unmirroredWrites.add(1, ordering: .sequentiallyConsistent)
            let (device, writer, log) = routing.withLock { ($0.device, $0.writer, $0.failedJob?.log) }
            guard let writer else {
                defer { unmirroredWrites.subtract(1, ordering: .sequentiallyConsistent) }
                guard let log else {
                    return try write.apply(to: device, at: offset, skip: 0, length: write.length, cache: cache)
                }
                log.mark(offset: offset, length: write.length)
                defer { log.finished(offset: offset, length: write.length) }
                return try write.apply(to: device, at: offset, skip: 0, length: write.length, cache: cache)
            }
            unmirroredWrites.subtract(1, ordering: .sequentiallyConsistent)
            if try writer.filterWrite(write, at: offset, cache: cache, sourceWritten: written) == .done { return }
        }
    }

    /// fsync/fdatasync: the device served; in write-blocking mode the target too.
    public func flush(dataOnly: Bool) throws(Errno) {
        guard !isReadOnly else { return }
        let (device, writer) = routing.withLock { ($0.device, $0.writer) }
        guard let writer else { return try device.flush(dataOnly: dataOnly) }
        try writer.flush { Result { () throws(Errno) in try device.flush(dataOnly: dataOnly) } }.get()
    }

    /// Applies `change` to the range. A range past the end is cut for changes that keep
    /// the size; one that would grow the image is refused (EPERM: its size is fixed).
    public func changeAllocation(_ change: AllocationChange, at offset: UInt64, length: UInt64, keepSize: Bool) throws(Errno) {
        guard !isReadOnly else { throw .readOnlyFileSystem }
        let (end, overflow) = offset.addingReportingOverflow(length)
        if (overflow || end > size) && !keepSize { throw .notPermitted }
        guard offset < size, length > 0 else { return }
        let cut = min(overflow ? size : end, size) - offset
        switch change {
        case .punchHole: try route(.punchHole(length: cut), at: offset, cache: .cached)
        case .zeroRange: try route(.zeroRange(length: cut), at: offset, cache: .cached)
        // Contents do not change: nothing for the mirror to do.
        case .preallocate: try device.preallocate(at: offset, length: cut)
        }
    }

    /// SEEK_DATA/SEEK_HOLE on the image. Past the end both fail with ENXIO, as lseek(2) does.
    public func seek(_ target: SeekTarget, from offset: UInt64) throws(Errno) -> UInt64 {
        guard offset < size else { throw .noSuchAddressOrDevice }
        return try device.seek(target, from: offset)
    }

    public func allocatedBytes() throws(Errno) -> UInt64 {
        try device.allocatedBytes()
    }

    /// statfs of the mount: the storage of the device served (the target after a pivot).
    public func fileSystemStatistics() -> statvfs? {
        device.fileSystemStatistics()
    }

    /// `.status/job.json`: the job as QEMU's BlockJobInfo, `null` while there is none.
    public func jobJSON() -> String {
        guard let job else { return "null\n" }
        return job.info().jsonText + "\n"
    }

    /// `.status/metrics.prom`: the image's and the job's figures for Prometheus.
    public func metricsText(mountpoint: String, imageName: String) -> String {
        JobMetrics.text(mountpoint: mountpoint, image: imageName, imageSize: size, writesServed: servedWrites,
                        serving: device.location, job: job?.info())
    }
}
