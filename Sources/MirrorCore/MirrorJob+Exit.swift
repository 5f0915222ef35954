import Foundation
import SystemPackage

/// How the job lets go of the image, and what becomes of its dirty log.
enum Ending: Sendable, Equatable {
    /// Completed: the mount serves the target; the log holds the `completed` record.
    case pivoted
    /// Soft-cancelled after ready: the target is a consistent copy, the source stays served.
    case converged
    /// Cancelled before converging (forced, or any cancel before ready).
    case cancelled
    /// Failed: the log stays and every later write marks it, so a restart copies those too.
    case failed

    /// A cancel's log no longer describes anything and goes before writes resume unlogged
    /// on the source (a pivot's log keeps its `completed` record).
    var retiresLog: Bool { self == .converged || self == .cancelled }
}

// MARK: - Convergence (complete or soft cancel with a clean bitmap)

extension MirrorState {
    /// The next step of a convergence under way: hold new writes, wait for those inside,
    /// check the bitmap again, flush the target, record the completion. Nil when it cannot
    /// go on (an error, a forced cancel, a pause, the mount's end, new dirt): the writes are
    /// let through again and the loop goes on.
    mutating func continueConvergence(_ stage: Convergence) -> LoopStep? {
        // Once the completion is durable the source is stale: the job must pivot.
        if stage == .recorded { return .exit(.converged) }
        // (A pause asked for meanwhile takes effect if the convergence does not end the job.)
        guard error == nil, pendingExit == .complete || pendingExit == .cancel, !shuttingDown else {
            abandonConvergence()
            return nil
        }
        switch stage {
        case .draining:
            if filterWrites > 0 { return .wait(until: nil) }
            if dirty.dirtyChunks > 0 || backgroundOps > 0 {
                abandonConvergence()
                return nil
            }
            return .flushTarget(.completion)
        case .flushed:
            // Durable before the pivot: from here on the source is stale, and a restart of
            // the old mount command must say so instead of copying it back. (A crash before
            // the pivot takes effect finds target == source, writes held.)
            return pendingExit == .complete && hasLog ? .recordCompletion : .exit(.converged)
        case .recorded:
            return .exit(.converged)
        }
    }

    mutating func abandonConvergence() {
        convergence = nil
        if writeGate == .held { writeGate = .open }
    }

    /// The `completed` record was written (or failed to be: a target error, no pivot).
    mutating func completionRecorded(error failure: Errno?, now: Double) {
        if let failure {
            errorAction(isRead: false, error: failure, now: now)
            abandonConvergence()
        } else if convergence == .flushed {
            convergence = .recorded
        }
    }
}

// MARK: - Exit (mirror_exit_common, then job_finalize, job_conclude, job_dismiss)

extension MirrorState {
    /// Background operations are done (asserted): the copy workers return.
    mutating func stopCopiers() {
        precondition(backgroundOps == 0, "background operations in flight at exit")
        copiersExit = true
        queue.removeAll()
    }

    /// The loop ended with `outcome`: a converged job waits, then is pending (and waits
    /// for finalize without auto-finalize).
    mutating func loopEnded(_ outcome: JobOutcome) {
        self.outcome = outcome
        switch outcome {
        case .converged:
            progressRemaining = 0
            transition(to: .waiting)
            transition(to: .pending)
            if !options.autoFinalize {
                emit(.pending(id: id))
                awaiting = .finalize
            }
        case .failed(let message):
            error = error ?? message
        case .cancelled:
            break
        }
    }

    /// How the job lets go, once it may (nil while it waits for finalize).
    func ending() -> Ending? {
        guard let outcome else { return nil }
        let forced = pendingExit?.isForced == true
        switch outcome {
        case .converged:
            if awaiting == .finalize && !forced { return nil }
            if forced { return .cancelled }
            return pendingExit == .complete ? .pivoted : .converged
        case .failed: return .failed
        case .cancelled: return .cancelled
        }
    }

    /// Letting go starts: new writes wait; done once the writes inside the job have
    /// finished (none may land after a next job's first pass, unseen), with whether the
    /// log is to be retired.
    mutating func holdWritesForLetGo(_ ending: Ending) -> ConditionLock<MirrorState>.Decision<Bool> {
        writeGate = .held
        if filterWrites > 0 { return .wait(timeout: nil) }
        return .done(ending.retiresLog && hasLog && pendingExit != .forceCancel(keepLog: true))
    }

    /// The filter no longer routes writes through the job; held writes go to the device now served.
    mutating func letGoDone() {
        writeGate = .closed
    }

    /// The job's final events, then concluded (and waits for dismiss without auto-dismiss).
    mutating func conclude(_ ending: Ending) {
        let len = progressCurrent + progressRemaining
        switch ending {
        case .pivoted, .converged:
            emit(.completed(device: id, len: progressCurrent, offset: progressCurrent, speed: speed, error: nil))
        case .failed:
            transition(to: .aborting)
            emit(.completed(device: id, len: len, offset: progressCurrent, speed: speed, error: error))
        case .cancelled:
            transition(to: .aborting)
            emit(.cancelled(device: id, len: len, offset: progressCurrent, speed: speed))
        }
        if error != nil || pendingExit?.isForced == true { activelySynced = false }
        transition(to: .concluded)
        if !options.autoDismiss { awaiting = .dismiss }
    }
}

extension MirrorJob {
    func jobExit(_ outcome: JobOutcome) {
        // Background operations finish before the job lets go (asserted by QEMU at exit too).
        state.withLock(waiting: { s in s.backgroundOps > 0 ? .wait(timeout: nil) : .done(s.stopCopiers()) })
        locked { $0.loopEnded(outcome) }
        let ending = state.withLock(waiting: { s in s.ending().map { .done($0) } ?? .wait(timeout: nil) })
        letGo(ending)
        locked { $0.conclude(ending) }
        state.withLock(waiting: { s in s.awaiting == .dismiss ? .wait(timeout: nil) : .done(()) })
        state.withLock { $0.transition(to: .null) }
        state.broadcast()
        // Gone from queries before the `null` event leaves, as in QEMU.
        lifecycle(.dismissed)
        deliverEvents()
    }

    /// The filter stops routing writes through the job (after switching to the target on
    /// a pivot); writes held meanwhile resume against the device now served.
    private func letGo(_ ending: Ending) {
        let retireLog = state.withLock(waiting: { $0.holdWritesForLetGo(ending) })
        if retireLog { log?.retire() }
        lifecycle(.detach(pivot: ending == .pivoted, failed: ending == .failed))
        locked { $0.letGoDone() }
    }

    /// Writes the `completed` record, durably, before the pivot.
    func recordCompletion() {
        guard let log else { return }
        let failure = Result { () throws(Errno) in try log.setRecord(.completed(time: UInt64(max(0, time(nil))))) }.failure
        // The header may or may not say `completed` now: the log goes, so no restart is
        // sent to a target that never became the image.
        if let failure { log.breakLog(failure) }
        let now = clock.now()
        locked { $0.completionRecorded(error: failure, now: now) }
    }
}
