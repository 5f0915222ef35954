import Foundation
import SystemPackage

/// How the main loop ended.
enum JobOutcome {
    case converged
    case failed(String)
    case cancelled
}

extension MirrorJob {
    /// Starts the job: created → running, writes tracked from this moment (before any scan,
    /// so no write can slip between scan and tracking), then the job thread and copy workers.
    public func start() {
        locked {
            transition(to: .created)
            transition(to: .running)
        }
        for index in 0..<Self.maxInFlight {
            let worker = Thread { [self] in copyWorker() }
            worker.name = "mirror-copy-\(index)"
            worker.start()
        }
        let main = Thread { [self] in run() }
        main.name = "mirror-job"
        main.start()
    }

    // MARK: - Main loop (mirror_run)

    private func run() {
        let outcome = setUpAndLoop()
        exit(with: outcome)
    }

    private func setUpAndLoop() -> JobOutcome {
        guard target.size == size else { return .failed("Source and target image have different sizes") }
        if size == 0 {
            lock.withLock { enterReady() }
            activelySyncedValue.store(true, ordering: .releasing)
        } else if options.resumeFromLog, let log {
            let ranges = log.loggedRanges(imageSize: size)
            lock.withLock { for r in ranges { state.dirty.set(state.dirty.chunks(covering: r.offset, length: r.length)) } }
        } else if options.sync == .full {
            if options.targetIsZero {
                markSourceDataDirty()
            } else {
                lock.withLock { state.dirty.setAll() }
            }
        }
        return lock.withLock { mainLoop() }
    }

    /// Marks every allocated range of the source dirty (SEEK_DATA/SEEK_HOLE, on the job
    /// thread: never on a request path). A source that cannot tell is all data.
    private func markSourceDataDirty() {
        var offset: UInt64 = 0
        while offset < size {
            let dataStart: UInt64
            do {
                dataStart = try source.seek(.data, from: offset)
            } catch .noSuchAddressOrDevice {
                return
            } catch {
                lock.withLock { state.dirty.set(state.dirty.chunks(covering: offset, length: size - offset)) }
                return
            }
            let dataEnd = (try? source.seek(.hole, from: dataStart)) ?? size
            lock.withLock { state.dirty.set(state.dirty.chunks(covering: dataStart, length: min(dataEnd, size) - dataStart)) }
            offset = dataEnd
            if lock.withLock({ state.forceCancelled }) { return }
        }
    }

    /// One pass after another until the job converges, fails or is cancelled. Lock held.
    private func mainLoop() -> JobOutcome {
        while true {
            if let error = state.error { return .failed(error) }
            if state.forceCancelled { return .cancelled }
            if state.userPaused {
                pausePoint()
                continue
            }
            let dirtyBytes = state.dirty.dirtyBytes
            state.progressRemaining = dirtyBytes + state.bytesInFlight + state.activeBytesInFlight
            state.busy = true

            var launched = false
            var rateDelay: Double = 0
            if state.ioStatus == .ok && dirtyBytes > 0 && state.backgroundOps < Self.maxInFlight
                && monotonicNow() >= state.retryAt && !state.shuttingDown {
                rateDelay = state.becameReady ? 0 : rateLimitDelay()
                if rateDelay == 0 { launched = iterate() }
            }

            if state.backgroundOps == 0 && state.dirty.dirtyChunks == 0 {
                if !state.becameReady {
                    guard flushTarget() else { continue }
                    if state.error != nil || state.forceCancelled { continue }
                    if state.dirty.dirtyChunks > 0 || state.backgroundOps > 0 { continue }
                    enterReady()
                }
                if copyMode != .background && state.activeBytesInFlight == 0 && state.unmirroredWrites == 0
                    && state.error == nil && state.ioStatus == .ok {
                    activelySyncedValue.store(true, ordering: .releasing)
                }
                if (state.completeRequested || state.cancelRequested) && !state.shuttingDown {
                    if converge() { return .converged }
                    continue
                }
            }
            if launched { continue }
            if log != nil && !state.shuttingDown && monotonicNow() - state.lastSweep >= DirtyLog.sweepInterval { sweepLog() }
            // Nothing to start now: wait for a completion, a write, a verb, or time.
            state.busy = state.backgroundOps > 0
            if rateDelay > 0 {
                waitForChange(timeout: rateDelay)
            } else if state.retryAt > monotonicNow() {
                waitForChange(timeout: state.retryAt - monotonicNow())
            } else {
                // QEMU's BLOCK_JOB_SLICE_TIME: any change broadcasts sooner.
                waitForChange(timeout: 0.1)
            }
        }
    }

    /// Clears logged regions that are clean and were not written for two sweeps, after a
    /// target flush (so a cleared bit never hides data the target could still lose). Lock held.
    private func sweepLog() {
        state.lastSweep = monotonicNow()
        guard let log else { return }
        let clean = unlocked { log.sweepCandidates() }.filter { region in
            let offset = UInt64(region) * DirtyLog.regionSize
            let chunks = state.dirty.chunks(covering: offset, length: min(DirtyLog.regionSize, size - offset))
            return !chunks.contains { state.dirty.isDirty($0) || state.inFlight.isDirty($0) }
        }
        guard !clean.isEmpty else { return }
        let flushed = unlocked { Result { () throws(Errno) in try target.flush(dataOnly: true) } }
        if case .success = flushed { unlocked { log.clear(clean) } }
    }

    /// running → ready, BLOCK_JOB_READY once. Lock held.
    private func enterReady() {
        state.becameReady = true
        transition(to: .ready)
        emit(JobEvent(.ready(device: id, len: state.progressCurrent + state.progressRemaining,
                             offset: state.progressCurrent, speed: state.speed)))
    }

    /// Flushes the target with the lock released; a failure goes to the error policy. Lock held.
    private func flushTarget() -> Bool {
        state.busy = true
        let result = unlocked { Result { () throws(Errno) in try target.flush(dataOnly: false) } }
        if case .failure(let error) = result {
            errorAction(isRead: false, error: error)
            return false
        }
        return true
    }

    /// Runs `body` with the lock released (queued events leave first).
    func unlocked<R>(_ body: () -> R) -> R {
        lock.unlock()
        defer { lock.lock() }
        deliverEvents()
        return body()
    }

    /// The job thread's wait: queued events leave first (then the caller re-checks what it
    /// waits for), else a broadcast or `timeout`. Lock held.
    func waitForChange(timeout: Double? = nil) {
        if !state.outbox.isEmpty {
            unlocked {}
            return
        }
        lock.wait(timeout: timeout)
    }

    /// A user pause or an error stop takes effect: wait for background I/O, then
    /// running → paused / ready → standby until resumed or force-cancelled. Lock held.
    private func pausePoint() {
        while state.backgroundOps > 0 { waitForChange() }
        let wasReady = state.status == .ready
        transition(to: wasReady ? .standby : .paused)
        state.busy = false
        while state.userPaused && !state.forceCancelled { waitForChange() }
        transition(to: wasReady ? .ready : .running)
    }

    /// Token bucket for `speed`: seconds to wait before the next operation may start. Lock held.
    private func rateLimitDelay() -> Double {
        guard state.speed > 0 else { return 0 }
        let now = monotonicNow()
        let speed = Double(state.speed)
        // At most one 100 ms slice of burst, as QEMU's slice quota.
        state.allowance = min(state.allowance + (now - state.allowanceTime) * speed, speed * 0.1)
        state.allowanceTime = now
        return state.allowance > 0 ? 0 : -state.allowance / speed
    }

    // MARK: - One iteration (mirror_iteration)

    /// Claims the next run of dirty chunks and queues it for a copy worker. Returns false
    /// when the next dirty chunk is busy. Lock held.
    private func iterate() -> Bool {
        guard let first = state.dirty.nextDirty(from: state.cursor) else { return false }
        // Background copies wait only for their first chunk (and never take one a
        // write-blocking write is waiting for).
        guard !state.inFlight.isDirty(first), !isWaitedForByActiveWrite(first) else {
            state.cursor = first + 1 < state.dirty.chunkCount ? first + 1 : 0
            return false
        }
        let maxChunks = Int(maxRunBytes / options.granularity)
        var end = first + 1
        while end < state.dirty.chunkCount, end - first < maxChunks, state.dirty.isDirty(end),
              !state.inFlight.isDirty(end), !isWaitedForByActiveWrite(end) {
            end += 1
        }
        let chunks = first..<end
        let offset = UInt64(first) * options.granularity
        let length = min(UInt64(end) * options.granularity, size) - offset
        // The copy buffer (buf-size) bounds the bytes in flight; one run always fits.
        guard state.bytesInFlight == 0 || state.bytesInFlight + length <= options.bufSize else { return false }
        // Clear the dirty bits before reading: a write racing with the copy re-dirties
        // its chunk, so it is copied again.
        state.dirty.clear(chunks)
        state.inFlight.set(chunks)
        state.cursor = end < state.dirty.chunkCount ? end : 0
        state.backgroundOps += 1
        state.bytesInFlight += length
        if state.speed > 0 && !state.becameReady { state.allowance -= Double(length) }
        state.queue.append(CopyOperation(chunks: chunks, offset: offset, length: length))
        lock.broadcast()
        return true
    }

    private func isWaitedForByActiveWrite(_ chunk: Int) -> Bool {
        state.waitingActive.contains { $0.contains(chunk) }
    }

    // MARK: - Copy workers (mirror_co_read / mirror_co_zero_or_discard)

    private func copyWorker() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(Self.maxIOBytes), alignment: 4096)
        defer { buffer.deallocate() }
        while true {
            let next: CopyOperation? = lock.withLock {
                while state.queue.isEmpty && !state.workersExit { lock.wait() }
                return state.queue.isEmpty ? nil : state.queue.removeFirst()
            }
            guard let operation = next else { return }
            let failure = perform(operation, buffer: buffer)
            locked { operationDone(operation, failure: failure) }
        }
    }

    /// Copies one run: data ranges are read and written (all-zero data becomes a hole),
    /// holes are punched, so the target stays as sparse as the source.
    private func perform(_ op: CopyOperation, buffer: UnsafeMutableRawBufferPointer) -> (isRead: Bool, error: Errno)? {
        var offset = op.offset
        let end = op.offset + op.length
        while offset < end {
            let (isData, extentEnd) = sourceExtent(at: offset, limit: end)
            if !isData {
                do { try zeroTarget(at: offset, length: extentEnd - offset) } catch { return (false, error) }
                offset = extentEnd
                continue
            }
            while offset < extentEnd {
                let count = Int(min(extentEnd - offset, Self.maxIOBytes))
                let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
                do {
                    let got = try source.read(into: piece, at: offset, cache: .direct)
                    guard got == count else { return (true, .ioError) }
                } catch {
                    return (true, error)
                }
                do {
                    if piece.allSatisfy({ $0 == 0 }) {
                        try zeroTarget(at: offset, length: UInt64(count))
                    } else {
                        try target.write(UnsafeRawBufferPointer(piece), at: offset, cache: .direct)
                    }
                } catch {
                    return (false, error)
                }
                offset += UInt64(count)
            }
        }
        return nil
    }

    /// Whether `offset` starts data or a hole in the source, and where that extent ends.
    private func sourceExtent(at offset: UInt64, limit: UInt64) -> (isData: Bool, end: UInt64) {
        let dataStart: UInt64
        do {
            dataStart = try source.seek(.data, from: offset)
        } catch .noSuchAddressOrDevice {
            return (false, limit)  // only a hole follows
        } catch {
            return (true, limit)   // cannot tell: treat as data and let the read decide
        }
        if dataStart > offset { return (false, min(dataStart, limit)) }
        let holeStart = (try? source.seek(.hole, from: offset)) ?? limit
        return (true, min(max(holeStart, offset + 1), limit))
    }

    /// Makes the target range read as zeroes, as a hole where the target can.
    private func zeroTarget(at offset: UInt64, length: UInt64) throws(Errno) {
        try writeZeroes(to: target, at: offset, length: length, preferHole: true)
    }

    /// mirror_iteration_done: release the chunks; on failure re-dirty and apply the policy. Lock held.
    private func operationDone(_ op: CopyOperation, failure: (isRead: Bool, error: Errno)?) {
        state.inFlight.clear(op.chunks)
        state.backgroundOps -= 1
        state.bytesInFlight -= op.length
        if let failure {
            state.dirty.set(op.chunks)
            errorAction(isRead: failure.isRead, error: failure.error)
        } else {
            state.progressCurrent += op.length
            state.retryBackoff = 0.05
        }
        lock.broadcast()
    }

    // MARK: - Errors (mirror_error_action)

    /// Every error the job handles: actively-synced false, one BLOCK_JOB_ERROR, then the
    /// policy. Lock held.
    func errorAction(isRead: Bool, error: Errno) {
        activelySyncedValue.store(false, ordering: .releasing)
        let policy = isRead ? options.onSourceError : options.onTargetError
        emit(JobEvent(.error(device: id, operation: isRead ? "read" : "write", action: policy)))
        switch policy {
        case .report:
            if state.error == nil { state.error = Self.message(for: error) }
        case .ignore:
            // Retried by a later pass; back off so a persistent error does not spin.
            state.retryAt = monotonicNow() + state.retryBackoff
            state.retryBackoff = min(state.retryBackoff * 2, 1)
        case .stop:
            state.ioStatus = error == .noSpace ? .nospace : .failed
            state.userPaused = true
        }
        lock.broadcast()
    }

    static func message(for error: Errno) -> String {
        String(cString: strerror(error.rawValue))
    }

    // MARK: - Convergence and exit

    /// Complete or soft cancel with a clean bitmap: hold new writes back, wait for running
    /// ones, check again, flush the target. On success new writes stay held until the
    /// filter has switched over. Lock held.
    private func converge() -> Bool {
        state.drained = true
        while state.filterWrites > 0 { waitForChange() }
        if state.dirty.dirtyChunks > 0 || state.backgroundOps > 0 {
            state.drained = false
            lock.broadcast()
            return false
        }
        guard flushTarget() else {
            state.drained = false
            lock.broadcast()
            return false
        }
        if state.shuttingDown {
            // The mount ended meanwhile: it records a clean stop, not a completion.
            state.drained = false
            lock.broadcast()
            return false
        }
        if state.completeRequested, let log {
            // Durable before the pivot: from here on the source is stale, and a restart of
            // the old mount command must say so instead of copying it back. (A crash before
            // the pivot takes effect finds target == source, writes held.)
            let recorded = unlocked { Result { () throws(Errno) in
                try log.setRecord(.completed(time: UInt64(max(0, time(nil)))))
            } }
            if case .failure(let error) = recorded {
                // The header may or may not say `completed` now: the log goes, so no restart
                // is sent to a target that never became the image.
                unlocked { log.breakLog(error) }
                errorAction(isRead: false, error: error)
                state.drained = false
                lock.broadcast()
                return false
            }
        }
        return true
    }

    private func exit(with outcome: JobOutcome) {
        lock.lock()
        // Background operations finish before the job lets go (asserted by QEMU at exit too).
        while state.backgroundOps > 0 { waitForChange() }
        state.workersExit = true
        state.queue.removeAll()
        lock.broadcast()
        let len = state.progressCurrent + state.progressRemaining

        switch outcome {
        case .converged:
            let pivot = state.completeRequested
            state.progressRemaining = 0
            transition(to: .waiting)
            transition(to: .pending)
            if !options.autoFinalize {
                emit(JobEvent(.pending(id: id)))
                while !state.finalizeRequested && !state.forceCancelled { waitForChange() }
            }
            if state.forceCancelled {
                letGo(.cancelled)
                transition(to: .aborting)
                emit(JobEvent(.cancelled(device: id, len: len, offset: state.progressCurrent, speed: state.speed)))
            } else {
                letGo(pivot ? .pivoted : .cancelled)
                emit(JobEvent(.completed(device: id, len: state.progressCurrent, offset: state.progressCurrent,
                                         speed: state.speed, error: nil)))
            }
        case .failed(let message):
            state.error = state.error ?? message
            letGo(.failed)
            transition(to: .aborting)
            emit(JobEvent(.completed(device: id, len: len, offset: state.progressCurrent, speed: state.speed, error: state.error)))
        case .cancelled:
            letGo(.cancelled)
            transition(to: .aborting)
            emit(JobEvent(.cancelled(device: id, len: len, offset: state.progressCurrent, speed: state.speed)))
        }
        if state.error != nil || state.forceCancelled { activelySyncedValue.store(false, ordering: .releasing) }
        transition(to: .concluded)
        if !options.autoDismiss {
            while !state.dismissRequested { waitForChange() }
        }
        transition(to: .null)
        lock.unlock()
        // Gone from queries before the `null` event leaves, as in QEMU.
        lifecycle(.dismissed)
        deliverEvents()
    }

    /// How the job lets go of the image, and what becomes of its dirty log.
    private enum Ending {
        /// The mount serves the target; the log holds the `completed` record (written in `converge`).
        case pivoted
        /// Cancelled (soft or forced, an error during the cancel included): the log no
        /// longer describes anything and goes before writes resume unlogged on the source.
        case cancelled
        /// Failed: the log stays and every later write marks it, so a restart copies those too.
        case failed
    }

    /// The filter stops routing writes through the job (after switching to the target on
    /// pivot); writes held by the drain resume against the device now served. Lock held.
    private func letGo(_ ending: Ending) {
        // Writes already inside the job finish first (QEMU drains before it removes its
        // filter): none may land after a next job's first pass, unseen. New ones wait.
        state.drained = true
        while state.filterWrites > 0 { waitForChange() }
        if ending == .cancelled, let log, !state.keepLog { unlocked { log.retire() } }
        unlocked { lifecycle(.detach(pivot: ending == .pivoted, failed: ending == .failed)) }
        state.detached = true
        state.drained = false
        lock.broadcast()
    }
}
