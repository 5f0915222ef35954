import SystemPackage

/// What a request does to the image, as the filter hands it to the job.
public enum ImageWrite {
    case data(UnsafeRawBufferPointer)
    case punchHole(length: UInt64)
    case zeroRange(length: UInt64)

    var length: UInt64 {
        switch self {
        case .data(let buffer): UInt64(buffer.count)
        case .punchHole(let length), .zeroRange(let length): length
        }
    }

    /// The data of `part` (relative to the write's start); nil for a hole or ZERO_RANGE.
    func data(_ part: Range<UInt64>) -> UnsafeRawBufferPointer? {
        guard case .data(let buffer) = self else { return nil }
        return UnsafeRawBufferPointer(rebasing: buffer[Int(part.lowerBound)..<Int(part.upperBound)])
    }

    /// The same operation on [offset+skip, offset+skip+length) of `device`. On a target,
    /// zeroes stay thin (SPEC 10, as QEMU's mirror with its zero bitmap): a ZERO_RANGE, a
    /// hole, or data that is all zero becomes write-zeroes (a hole where the target can
    /// keep reads zero: punch hole, NBD write-zeroes without NO_HOLE; else written zeroes).
    /// On the source the user gets exactly what was asked, and the source's errno.
    func apply(to device: any BlockDevice, at offset: UInt64, skip: UInt64, length: UInt64, cache: CachePolicy,
               isTarget: Bool = false) throws(Errno) {
        guard length > 0 else { return }
        switch self {
        case .data:
            let slice = data(skip..<skip + length)!
            if isTarget && isAllZero(slice) {
                try writeZeroes(to: device, at: offset + skip, length: length, preferHole: true)
            } else {
                try device.write(slice, at: offset + skip, cache: cache)
            }
        case .punchHole where isTarget, .zeroRange where isTarget:
            try writeZeroes(to: device, at: offset + skip, length: length, preferHole: true)
        case .punchHole:
            try device.punchHole(at: offset + skip, length: length)
        case .zeroRange:
            try device.zeroRange(at: offset + skip, length: length)
        }
    }
}

/// The result of handing a write to the job.
public enum FilterWriteResult {
    case done
    /// The job let go of the image meanwhile: send the write to the device now served.
    case detached
}

/// One write through the job, after QEMU's MirrorOp for an active write: what
/// active_write_prepare decided, and what do_sync_target_write sends.
struct MirrorOp: Sendable, Equatable {
    let offset: UInt64
    let length: UInt64
    /// The chunks the range touches.
    let chunks: Range<Int>
    /// Write-blocking (no error, not force-cancelled, target usable): the chunks are
    /// claimed and the write reaches the target before the reply. Otherwise the range is
    /// marked dirty after the source write.
    let mirrored: Bool
    /// The chunks are claimed (in flight) for this write.
    var claimed = false
    /// The part of the range (relative to `offset`) sent to the target, decided when the
    /// chunks are claimed: head and tail inside still-dirty chunks are left to the copier.
    var targetPart: Range<UInt64> = 0..<0
    /// Background mode after ready: not mirrored, but its chunks are claimed and its target
    /// part is written through asynchronously (`WriteThroughQueue`); the reply does not wait.
    var writeThrough = false
}

/// Whether a write enters the job.
enum WriteAdmission: Sendable, Equatable {
    /// It entered (counted in `filterWrites` until it settles).
    case admitted(MirrorOp)
    /// Held: the job converges or lets go.
    case held
    /// The job let go: send the write to the device the filter serves now.
    case detached
}

extension MirrorState {
    /// active_write_prepare, first half: the write enters the job, and the job decides
    /// once whether it is mirrored. A mirrored write registers the chunks it waits for.
    /// `canWriteThrough`: the write could go to the target asynchronously (O_DIRECT data,
    /// not all zero, to a target that takes it); in background mode after ready it does,
    /// when nothing holds its chunks and part of it lands in clean ones.
    mutating func admitWrite(offset: UInt64, length: UInt64, now: Double, canWriteThrough: Bool = false) -> WriteAdmission {
        switch writeGate {
        case .held: return .held
        case .closed: return .detached
        case .open: break
        }
        filterWrites += 1
        let mirrored = error == nil && pendingExit?.isForced != true && copyMode == .writeBlocking
            && targetUsable(now: now)
        var op = MirrorOp(offset: offset, length: length, chunks: dirty.chunks(covering: offset, length: length),
                          mirrored: mirrored)
        if mirrored {
            waitingActive.append(op.chunks)
            return .admitted(op)
        }
        if canWriteThrough && copyMode == .background && synced && error == nil && pendingExit == nil
            && !userPaused && !shuttingDown && targetUsable(now: now)
            && writeThroughs < WriteThroughQueue.depth
            && !(op.chunks.contains { inFlight.isDirty($0) || isWaitedForByActiveWrite($0) })
            && !targetPart(offset: offset, length: length).isEmpty {
            claim(&op)
            op.writeThrough = true
            writeThroughs += 1
            return .admitted(op)
        }
        unmirroredWrites += 1
        activelySynced = false
        return .admitted(op)
    }

    /// active_write_prepare, second half (mirror_wait_on_conflicts): an active write waits
    /// for its whole range, so fresh data reaches the target after any older copy of the
    /// same chunks. Once they are claimed, which part goes to the target is decided
    /// (do_sync_target_write's head/tail rule) and the chunks it covers whole are clean:
    /// nothing else can touch a claimed chunk's bits but a write that dirties more. True
    /// once claimed.
    mutating func claimChunks(_ op: inout MirrorOp) -> Bool {
        precondition(op.mirrored)
        if (op.chunks.contains { inFlight.isDirty($0) }) { return false }
        waitingActive.remove(at: waitingActive.firstIndex(of: op.chunks)!)
        claim(&op)
        return true
    }

    /// The chunks are claimed; decides the target part (the head/tail rule) and cleans the
    /// chunks it covers whole.
    private mutating func claim(_ op: inout MirrorOp) {
        inFlight.set(op.chunks)
        op.claimed = true
        let part = targetPart(offset: op.offset, length: op.length)
        guard !part.isEmpty else { return }
        dirty.clear(dirty.chunks(inside: op.offset + part.lowerBound, length: part.upperBound - part.lowerBound))
        activeBytesInFlight += part.upperBound - part.lowerBound
        op.targetPart = part
    }

    /// do_sync_target_write's head/tail rule: the part of a write (relative to `offset`)
    /// that goes to the target; an unaligned head or tail inside a still-dirty chunk is
    /// left to the copier.
    func targetPart(offset: UInt64, length: UInt64) -> Range<UInt64> {
        let granularity = options.granularity
        let end = offset + length
        var head: UInt64 = 0, tail = length
        if offset % granularity != 0 && dirty.isDirty(Int(offset / granularity)) {
            head = min((offset / granularity + 1) * granularity - offset, length)
        }
        if end % granularity != 0 && end != size && dirty.isDirty(Int((end - 1) / granularity)) {
            tail = max((end / granularity) * granularity, offset + head) - offset
        }
        return head < tail ? head..<tail : 0..<0
    }

    /// The source write returned. Not mirrored, or failed: the range is dirty (a failed
    /// write may have changed part of it, a short write before ENOSPC, and the target may
    /// hold the new data: the copier brings over whatever the source now holds).
    mutating func sourceWritten(_ op: inout MirrorOp, succeeded: Bool, now: Double) {
        if op.writeThrough {
            if !succeeded { userDirtied(op.chunks, now: now) }
        } else if !op.mirrored {
            activelySynced = false
            userDirtied(op.chunks, now: now)
            unmirroredWrites -= 1
        } else if !succeeded {
            activelySynced = false
            userDirtied(op.chunks, now: now)
        }
    }

    /// active_write_settle: account the target part (a failure re-dirties it and goes to
    /// the error policy, never to the user), release the chunks, leave the job. Returns
    /// who must be woken: writes waiting for chunks, the job thread when it waits for the
    /// writes inside to finish or an error changed its course.
    /// `notWritten`: the target part never went out (its write could not be submitted):
    /// it is dirty again, with no error.
    @discardableResult
    mutating func activeWriteSettle(_ op: MirrorOp, targetFailure: Errno?, notWritten: Bool = false, now: Double) -> [Wake] {
        let part = op.targetPart
        if !part.isEmpty {
            activeBytesInFlight -= part.upperBound - part.lowerBound
            if notWritten {
                markDirty(offset: op.offset + part.lowerBound, length: part.upperBound - part.lowerBound)
            } else if let targetFailure {
                markDirty(offset: op.offset + part.lowerBound, length: part.upperBound - part.lowerBound)
                errorAction(isRead: false, error: targetFailure, now: now)
            } else {
                progressCurrent += part.upperBound - part.lowerBound
                copyWindow.add(part.upperBound - part.lowerBound, now: now)
            }
        }
        if op.claimed { inFlight.clear(op.chunks) }
        filterWrites -= 1
        var wake: [Wake] = []
        if waitingWriters > 0 { wake.append(.writers) }
        var wakeJob = writeGate == .held || (targetFailure != nil && !part.isEmpty)
        if op.writeThrough {
            writeThroughs -= 1
            // actively-synced and the shutdown wait for the write-throughs in flight.
            wakeJob = wakeJob || copyMode == .writeBlocking || shuttingDown
        }
        if wakeJob { wake.append(.job) }
        return wake
    }
}

extension MirrorJob {
    /// bdrv_mirror_top_do_write: every write through the mount while the job runs.
    /// Background mode, or a job that failed or was force-cancelled: write the source, then
    /// mark the range dirty. Write-blocking: claim the whole range (waiting for overlapping
    /// operations), then write the source and the target at the same time (the target half
    /// on this thread's companion) — except the unaligned head or tail of a chunk that is
    /// still dirty, which the copier will take. The user sees the source's result only; a
    /// target failure goes to the error policy.
    ///
    /// No bounce buffer: the data is libfuse's request buffer, which the kernel already
    /// copied from the user and which nobody changes until this callback returns (after
    /// the reply, a write through still copies its target part from it).
    ///
    /// `sourceWritten`: called for a background write through, once the source holds it, so
    /// the caller replies before the target part is submitted (the user does not wait for it).
    public func filterWrite(_ write: ImageWrite, at offset: UInt64, cache: CachePolicy,
                            sourceWritten: () -> Void = {}) throws(Errno) -> FilterWriteResult {
        let length = write.length
        guard var op = activeWritePrepare(offset: offset, length: length,
                                          canWriteThrough: canWriteThrough(write, at: offset, cache: cache))
        else { return .detached }

        // The region's bit is durable before the source (or the target) changes: after a
        // crash the log covers every write that may have reached one and not the other.
        log?.mark(offset: offset, length: length)
        func writeSource() -> Errno? {
            Result { () throws(Errno) in try write.apply(to: source, at: offset, skip: 0, length: length, cache: cache) }.failure
        }
        if op.writeThrough {
            return try writeThrough(write, op: op, cache: cache, writeSource: writeSource, sourceWritten: sourceWritten)
        }
        var targetFailure: Errno?
        let sourceFailure: Errno?
        if op.targetPart.isEmpty {
            sourceFailure = writeSource()
        } else if let (source, target) = writeTargetAsynchronously(write, at: offset, part: op.targetPart, cache: cache,
                                                                   alongside: writeSource) {
            // do_sync_target_write, submitted to the kernel before the source write.
            (sourceFailure, targetFailure) = (source, target)
        } else {
            // do_sync_target_write on this thread's companion, alongside the source write.
            let part = op.targetPart
            sourceFailure = Companion.current.run(writeSource, alongside: {
                targetFailure = Result { () throws(Errno) in
                    try write.apply(to: target, at: offset, skip: part.lowerBound, length: part.upperBound - part.lowerBound,
                                    cache: cache, isTarget: true)
                }.failure
            })
        }
        let now = clock.now()
        // (A mirrored write whose source write succeeded has nothing to mark.)
        if !op.mirrored || sourceFailure != nil {
            state.withLock { $0.sourceWritten(&op, succeeded: sourceFailure == nil, now: now) }
        }

        log?.finished(offset: offset, length: length)
        let (wake, events) = state.withLock { s in
            (s.activeWriteSettle(op, targetFailure: targetFailure, now: now), !s.outbox.isEmpty)
        }
        self.wake(wake)
        if events { deliverEvents() }
        if let sourceFailure { throw sourceFailure }
        return .done
    }

    /// Whether the write could be written through asynchronously in background mode: O_DIRECT
    /// data, not all zero, that the target can take as it is.
    private func canWriteThrough(_ write: ImageWrite, at offset: UInt64, cache: CachePolicy) -> Bool {
        guard writeThroughQueue != nil, case .data(let buffer) = write, buffer.count <= WriteThroughQueue.maxBytes,
              target.asynchronousWriteDescriptor(offset: offset, count: buffer.count, cache: cache) != nil
        else { return false }
        return !isAllZero(buffer)
    }

    /// A background write after ready, its chunks claimed: the source write, then the reply
    /// (`sourceWritten`), then the target part is submitted from a copy of the data; whoever
    /// reaps its completion settles it. Writing the source first leaves it the disk alone,
    /// and the target write runs while the reply travels and the next request comes.
    private func writeThrough(_ write: ImageWrite, op: MirrorOp, cache: CachePolicy,
                              writeSource: () -> Errno?, sourceWritten: () -> Void) throws(Errno) -> FilterWriteResult {
        var op = op
        if let sourceFailure = writeSource() {
            // Nothing went to the target: the range is dirty, the copier brings the source over.
            let now = clock.now()
            state.withLock { $0.sourceWritten(&op, succeeded: false, now: now) }
            settleUnwritten(op)
            throw sourceFailure
        }
        sourceWritten()
        let part = op.targetPart
        guard let slice = write.data(part), let writeThroughQueue,
              let fd = target.asynchronousWriteDescriptor(offset: op.offset + part.lowerBound, count: slice.count, cache: cache),
              let tag = writeThroughQueue.submit(slice, to: fd, at: op.offset + part.lowerBound, for: op)
        else {
            settleUnwritten(op)
            return .done
        }
        // Settles whatever the kernel completed meanwhile (this one's own, rarely).
        let done = writeThroughQueue.sourceDone(tag)
        if !done.isEmpty { settleWriteThroughs(done) }
        return .done
    }

    /// A write through whose target part never went out: dirty again, for the copier.
    private func settleUnwritten(_ op: MirrorOp) {
        log?.finished(offset: op.offset, length: op.length)
        let now = clock.now()
        let wake = state.withLock { $0.activeWriteSettle(op, targetFailure: nil, notWritten: true, now: now) }
        self.wake(wake)
    }

    private func settleWriteThroughs(_ done: [(MirrorOp, Errno?)]) {
        for (op, _) in done { log?.finished(offset: op.offset, length: op.length) }
        let now = clock.now()
        let (wake, events) = state.withLock { s in
            (done.flatMap { s.activeWriteSettle($0.0, targetFailure: $0.1, now: now) }, !s.outbox.isEmpty)
        }
        self.wake(Array(Set(wake)))
        if events { deliverEvents() }
    }

    /// The reaper of the writes through to the target (a thread of the job's while it has
    /// a `WriteThroughQueue`): settles each completion whose source write has returned
    /// (the writer settles the others); ends once the job let go of the
    /// image's writes and none is in flight.
    func reapWriteThroughs(_ queue: WriteThroughQueue) {
        while true {
            guard let done = queue.reap(timeout: 100) else {
                if state.withLock({ $0.writeGate == .closed && $0.writeThroughs == 0 }) { return }
                continue
            }
            if !done.isEmpty { settleWriteThroughs(done) }
        }
    }

    /// Data that is not all zero, to a target that takes writes asynchronously (an O_DIRECT
    /// file): its part is in the kernel's queue while `writeSource` runs. Nil, with
    /// nothing done, otherwise (zeroes go to the target as write-zeroes).
    private func writeTargetAsynchronously(_ write: ImageWrite, at offset: UInt64, part: Range<UInt64>, cache: CachePolicy,
                                           alongside writeSource: () -> Errno?) -> (Errno?, Errno?)? {
        guard let slice = write.data(part), !isAllZero(slice) else { return nil }
        return target.write(slice, at: offset + part.lowerBound, cache: cache, alongside: writeSource)
    }

    /// active_write_prepare: admitted (held while the job converges or lets go) and, when
    /// mirrored, its chunks claimed. Nil when the job let go meanwhile.
    private func activeWritePrepare(offset: UInt64, length: UInt64, canWriteThrough: Bool) -> MirrorOp? {
        var admitted: MirrorOp?
        var waited = false
        let now = clock.now()
        return state.withLock(waiting: { s -> ConditionLock<MirrorState>.Decision<MirrorOp?> in
            func wait() -> ConditionLock<MirrorState>.Decision<MirrorOp?> {
                if !waited { s.waitingWriters += 1 }
                waited = true
                return .wait(timeout: nil, on: Wake.writers.rawValue)
            }
            func done(_ op: MirrorOp?) -> ConditionLock<MirrorState>.Decision<MirrorOp?> {
                if waited { s.waitingWriters -= 1 }
                return .done(op)
            }
            if admitted == nil {
                switch s.admitWrite(offset: offset, length: length, now: now, canWriteThrough: canWriteThrough) {
                case .held: return wait()
                case .detached: return done(nil)
                case .admitted(let op): admitted = op
                }
            }
            guard var op = admitted, op.mirrored else { return done(admitted) }
            guard s.claimChunks(&op) else { return wait() }
            return done(op)
        })
    }

    /// An fsync through the mount: `flushSource` runs here, and in write-blocking mode the
    /// target is flushed at the same time (SPEC 4); a target failure goes to the error
    /// policy, never to the user.
    public func flush<R>(source flushSource: () -> R) -> R {
        let now = clock.now()
        guard state.withLock({ $0.copyMode == .writeBlocking && $0.targetUsable(now: now) }) else { return flushSource() }
        var failure: Errno?
        let result = Companion.current.run(flushSource, alongside: {
            failure = Result(catching: { () throws(Errno) in try target.flush(dataOnly: true) }).failure
        })
        if let failure {
            let now = clock.now()
            locked { $0.errorAction(isRead: false, error: failure, now: now) }
        }
        return result
    }
}
