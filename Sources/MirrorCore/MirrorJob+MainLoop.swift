import Foundation
import SystemPackage

/// What the main loop does next (mirror_run), as its step decided it under the lock.
enum LoopStep: Sendable, Equatable {
    /// Nothing to do: wait for a broadcast (a completion, a write, a verb) or the time.
    case wait(until: Double?)
    /// Something others wait for changed, or events are queued: leave the lock (broadcast,
    /// deliver), then step again.
    case publish
    /// Copies were queued: wake the copy workers.
    case wakeCopiers
    /// Flush the target (before ready; before a completion) and report with `targetFlushed`.
    case flushTarget(FlushPurpose)
    /// Write the `completed` record to the dirty log and report with `completionRecorded`.
    case recordCompletion
    /// Sweep the dirty log (regions clean for two intervals).
    case sweepLog
    /// The loop is over.
    case exit(JobOutcome)
}

enum FlushPurpose: Sendable, Equatable {
    case ready
    case completion
}

extension MirrorState {
    /// One turn of mirror_run's loop: convergence under way, pause point, fatal error or
    /// forced cancel, then start copies, readiness, actively-synced, a requested
    /// convergence, the log's sweep, and how long to wait otherwise.
    mutating func step(now: Double) -> LoopStep {
        if let convergence {
            if let next = continueConvergence(convergence) { return next }
            return .publish  // abandoned: the writes it held go on
        }
        if let paused = pausePoint() { return paused }
        if let error { return .exit(.failed(error)) }
        if pendingExit?.isForced == true { return .exit(.cancelled) }
        autoWriteBlocking(now: now)
        // After an ignored error nothing touches the target before the back-off ends.
        let backingOff = now < retryAt

        let dirtyBytes = dirty.dirtyBytes
        progressRemaining = dirtyBytes + bytesInFlight + activeBytesInFlight
        busy = true
        var rateDelay: Double = 0
        if ioStatus == .ok && dirtyBytes > 0 && backgroundOps < Self.maxInFlight && !backingOff && !shuttingDown {
            rateDelay = synced ? 0 : rateLimitDelay(now: now)
            if rateDelay == 0 && iterate() { return .wakeCopiers }
        }

        if backgroundOps == 0 && dirty.dirtyChunks == 0 && !backingOff {
            // Ready once everything was copied and the target flushed (mirror_flush).
            if !synced { return .flushTarget(.ready) }
            // Mirrored writes still in flight do not count against it (as in QEMU): none
            // returns before its target part is written, and a failure clears the flag first.
            // Writes that missed the mirror do.
            if !activelySynced && copyMode == .writeBlocking && unmirroredWrites == 0 && writeThroughs == 0
                && error == nil && ioStatus == .ok {
                activelySynced = true
                return .publish
            }
            if (pendingExit == .complete || pendingExit == .cancel) && !shuttingDown {
                convergence = .draining
                writeGate = .held
                return continueConvergence(.draining) ?? .publish
            }
        }
        if hasLog && !shuttingDown && now - lastSweep >= DirtyLog.sweepInterval {
            lastSweep = now
            return .sweepLog
        }
        busy = backgroundOps > 0
        if !outbox.isEmpty { return .publish }
        if rateDelay > 0 { return .wait(until: now + rateDelay) }
        if retryAt > now { return .wait(until: retryAt) }
        return .wait(until: now + Self.sliceTime)
    }

    /// A user pause or an error stop takes effect once background I/O is done:
    /// running → paused / ready → standby, until resumed. A forced cancel ends the pause
    /// (even one an error stop asked for after it), and a fatal error that came before the
    /// pause took effect ends the job instead. Nil when the job is not paused (any more).
    mutating func pausePoint() -> LoopStep? {
        let paused = status == .paused || status == .standby
        if !userPaused || pendingExit?.isForced == true || (error != nil && !paused) {
            if paused { transition(to: status == .standby ? .ready : .running) }
            return nil
        }
        // An error while paused (a write-blocking write's target failure) waits for the resume.
        if !paused {
            if backgroundOps > 0 { return .wait(until: nil) }
            transition(to: status == .ready ? .standby : .paused)
        }
        busy = false
        return outbox.isEmpty ? .wait(until: nil) : .publish
    }

    /// The target was flushed (or failed to be): ready when still clean, the next step of
    /// a convergence, or the error policy.
    mutating func targetFlushed(_ purpose: FlushPurpose, error failure: Errno?, now: Double) {
        if let failure {
            errorAction(isRead: false, error: failure, now: now)
            if purpose == .completion { abandonConvergence() }
            return
        }
        switch purpose {
        case .ready:
            guard error == nil, pendingExit?.isForced != true, dirty.dirtyChunks == 0, backgroundOps == 0 else { return }
            enterReady()
        case .completion:
            if convergence == .draining { convergence = .flushed }
        }
    }

    /// running → ready, BLOCK_JOB_READY once.
    mutating func enterReady() {
        synced = true
        transition(to: .ready)
        emit(.ready(device: id, len: progressCurrent + progressRemaining, offset: progressCurrent, speed: speed))
    }

    /// The regions among `candidates` whose chunks are all clean and idle.
    func cleanRegions(_ candidates: [Int]) -> [Int] {
        candidates.filter { region in
            let offset = UInt64(region) * DirtyLog.regionSize
            let chunks = dirty.chunks(covering: offset, length: min(DirtyLog.regionSize, size - offset))
            return !chunks.contains { dirty.isDirty($0) || inFlight.isDirty($0) }
        }
    }
}

extension MirrorJob {
    /// Starts the job: created → running, writes tracked from this moment (before any scan,
    /// so no write can slip between scan and tracking), then the job thread and copy workers.
    public func start() {
        locked { s in
            s.transition(to: .created)
            s.transition(to: .running)
        }
        for index in 0..<MirrorState.maxInFlight {
            let worker = Thread { [self] in copyWorker() }
            worker.name = "mirror-copy-\(index)"
            worker.start()
        }
        if let writeThroughQueue {
            let reaper = Thread { [self] in reapWriteThroughs(writeThroughQueue) }
            reaper.name = "mirror-write-through"
            reaper.start()
        }
        let main = Thread { [self] in jobExit(setUpAndLoop()) }
        main.name = "mirror-job"
        main.start()
    }

    // MARK: - mirror_run

    private func setUpAndLoop() -> JobOutcome {
        guard target.size == size else { return .failed("Source and target image have different sizes") }
        if size == 0 {
            locked { s in
                s.enterReady()
                s.activelySynced = true
            }
        } else if options.resumeFromLog, let pairs = options.handOverRanges {
            // A hand-over: the previous server's own bitmap, finer than the log's regions.
            locked { s in
                for i in stride(from: 0, to: pairs.count - 1, by: 2) { s.markDirty(offset: pairs[i], length: pairs[i + 1]) }
            }
        } else if options.resumeFromLog, let log {
            let ranges = log.loggedRanges(imageSize: size)
            locked { s in for r in ranges { s.markDirty(offset: r.offset, length: r.length) } }
        } else if options.sync == .full {
            if options.targetIsZero {
                markSourceDataDirty()
            } else {
                locked { $0.dirty.setAll() }
            }
        }
        return mainLoop()
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
                locked { $0.markDirty(offset: offset, length: size - offset) }
                return
            }
            let dataEnd = min((try? source.seek(.hole, from: dataStart)) ?? size, size)
            let forced = locked { s in
                s.markDirty(offset: dataStart, length: dataEnd - dataStart)
                return s.pendingExit?.isForced == true
            }
            if forced { return }
            offset = dataEnd
        }
    }

    /// Steps until the loop is over, carrying out each step with the lock released.
    private func mainLoop() -> JobOutcome {
        while true {
            let step = state.withLock(waiting: { s -> ConditionLock<MirrorState>.Decision<LoopStep> in
                let now = clock.now()
                let step = s.step(now: now)
                guard case .wait(let until) = step else { return .done(step) }
                // Queued events leave before the job waits.
                if !s.outbox.isEmpty { return .done(.publish) }
                // Never longer than a slice: a manual clock's time moves without a broadcast.
                return .wait(timeout: min(until.map { $0 - now } ?? .infinity, MirrorState.sliceTime))
            })
            // New copies wake one copy worker each; any other step may have changed what
            // anyone waits for.
            if step == .wakeCopiers { state.signal(Wake.copiers.rawValue) } else { wake(Wake.allCases) }
            deliverEvents()
            switch step {
            case .wait, .publish, .wakeCopiers:
                continue
            case .flushTarget(let purpose):
                let failure = Result { () throws(Errno) in try target.flush(dataOnly: false) }.failure
                let now = clock.now()
                locked { $0.targetFlushed(purpose, error: failure, now: now) }
            case .recordCompletion:
                recordCompletion()
            case .sweepLog:
                sweepLog()
            case .exit(let outcome):
                return outcome
            }
        }
    }

    /// Clears logged regions that are clean and were not written for two sweeps, after a
    /// target flush (so a cleared bit never hides data the target could still lose).
    private func sweepLog() {
        guard let log else { return }
        let candidates = log.sweepCandidates()
        let clean = state.withLock { $0.cleanRegions(candidates) }
        guard !clean.isEmpty else { return }
        if case .success = Result(catching: { () throws(Errno) in try target.flush(dataOnly: true) }) { log.clear(clean) }
    }
}

extension Result {
    var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
