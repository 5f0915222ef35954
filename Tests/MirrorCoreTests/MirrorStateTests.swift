@testable import MirrorCore
import SystemPackage
import Testing

/// The engine's state machine, as tables: a state and an input give a new state and an
/// action. No threads, no devices, no sleeping: time is an argument.
struct MirrorStateTests {
    static let granularity: UInt64 = 64 << 10
    static let size: UInt64 = 4 << 20  // 64 chunks

    static func state(status: JobStatus = .running, copyMode: CopyMode = .background, synced: Bool = false,
                      speed: UInt64 = 0, log: Bool = false, configure: (inout MirrorOptions) -> Void = { _ in }) -> MirrorState {
        var options = MirrorOptions(jobID: "job0")
        options.granularity = granularity
        options.copyMode = copyMode
        options.speed = speed
        configure(&options)
        var s = MirrorState(options: options, size: size, hasLog: log, now: 0)
        s.status = status
        s.synced = synced
        return s
    }

    /// A ready job with nothing left to copy.
    static func readyState(copyMode: CopyMode = .background, log: Bool = false,
                           configure: (inout MirrorOptions) -> Void = { _ in }) -> MirrorState {
        state(status: .ready, copyMode: copyMode, synced: true, log: log, configure: configure)
    }

    static func names(_ events: [JobEvent]) -> [String] {
        events.map { e in
            if case let .statusChange(_, status) = e.kind { return "JSC " + status.rawValue }
            return e.name
        }
    }

    // MARK: - Verbs in every status (QEMU's JobVerbTable)

    static let verbs: [VerbRequest] = [.pause, .resume, .cancel(force: false), .cancel(force: true), .complete,
                                       .setSpeed(1 << 20), .change(.writeBlocking), .finalize, .dismiss]
    static let visibleStatuses = JobStatus.allCases.filter { $0 != .undefined }

    /// Should refuse a verb with QEMU's message and change nothing when the table does not
    /// allow it in the status; should take it (or refuse it only for the verb's own reason) otherwise.
    @Test(arguments: visibleStatuses, verbs)
    func verbTable(status: JobStatus, request: VerbRequest) throws {
        var s = Self.state(status: status, synced: status == .ready || status == .standby)
        if request == .resume { s.userPaused = true }  // so resume's own check passes
        let before = Snapshot(s)
        do {
            _ = try s.apply(request)
            #expect(request.verb.allowedIn.contains(status), "\(request) taken in \(status)")
        } catch {
            #expect(!request.verb.allowedIn.contains(status), "\(request) refused in \(status): \(error)")
            #expect(error.description == "Job 'job0' in state '\(status.rawValue)' cannot accept command verb '\(request.verb.rawValue)'")
            #expect(Snapshot(s) == before, "a refused verb changed the job")
        }
    }

    /// Should apply each verb's own rule and message, after the table allowed it.
    @Test(arguments: [
        // (setup, verb, expected error or nil, what the state shows after)
        VerbCase("pause twice", { $0.userPaused = true }, .pause, error: "Job is already paused"),
        VerbCase("resume unpaused", { _ in }, .resume, error: "Can't resume a job that was not paused"),
        VerbCase("resume clears an error stop", { $0.userPaused = true; $0.ioStatus = .nospace }, .resume,
                 check: { !$0.userPaused && $0.ioStatus == .ok }),
        VerbCase("soft cancel while paused", { $0.userPaused = true }, .cancel(force: false),
                 error: "The block job for device 'job0' is currently paused"),
        VerbCase("force cancel while paused unpauses", { $0.userPaused = true }, .cancel(force: true),
                 check: { !$0.userPaused && $0.pendingExit == .forceCancel(keepLog: false) }),
        VerbCase("cancel before ready is forced", { _ in }, .cancel(force: false),
                 check: { $0.pendingExit == .forceCancel(keepLog: false) }),
        VerbCase("cancel after ready converges", { $0.status = .ready; $0.synced = true }, .cancel(force: false),
                 check: { $0.pendingExit == .cancel }),
        VerbCase("a mount that did not come up keeps its log", { _ in }, .cancel(force: true, keepLog: true),
                 check: { $0.pendingExit == .forceCancel(keepLog: true) }),
        VerbCase("complete after a soft cancel", { $0.status = .ready; $0.synced = true; $0.pendingExit = .cancel }, .complete,
                 error: "The active block job 'job0' cannot be completed"),
        VerbCase("soft cancel after complete still pivots", { $0.status = .ready; $0.synced = true; $0.pendingExit = .complete },
                 .cancel(force: false), check: { $0.pendingExit == .complete }),
        VerbCase("force cancel after complete", { $0.status = .ready; $0.synced = true; $0.pendingExit = .complete },
                 .cancel(force: true), check: { $0.pendingExit == .forceCancel(keepLog: false) }),
        VerbCase("negative speed", { _ in }, .setSpeed(-1), error: "Parameter 'speed' expects a non-negative value"),
        VerbCase("speed", { _ in }, .setSpeed(4096), check: { $0.speed == 4096 }),
        VerbCase("change to background", { $0.copyMode = .writeBlocking }, .change(.background),
                 error: "Change to copy mode 'background' is not implemented"),
        VerbCase("change to the same mode", { _ in }, .change(.background), check: { $0.copyMode == .background }),
        VerbCase("change to write-blocking", { _ in }, .change(.writeBlocking), check: { $0.copyMode == .writeBlocking }),
        VerbCase("finalize a pending job", { $0.status = .pending; $0.awaiting = .finalize }, .finalize,
                 check: { $0.awaiting == nil }),
        VerbCase("dismiss a concluded job", { $0.status = .concluded; $0.awaiting = .dismiss }, .dismiss,
                 check: { $0.awaiting == nil }),
    ])
    func verbRule(_ c: VerbCase) {
        var s = Self.state()
        c.setup(&s)
        let before = Snapshot(s)
        do {
            _ = try s.apply(c.request)
            #expect(c.error == nil, "\(c.name): taken")
            #expect(c.check(s), "\(c.name)")
        } catch {
            #expect(error.description == c.error, "\(c.name)")
            #expect(Snapshot(s) == before, "\(c.name): a refused verb changed the job")
        }
    }

    /// Should ask the driver to retry the target after a resume, and nothing else.
    @Test func resumeRetriesTheTarget() throws {
        var s = Self.state()
        s.userPaused = true
        #expect(try s.apply(.resume) == .retryTarget)
        #expect(try s.apply(.pause) == VerbEffect.none)
    }

    // MARK: - Iteration and copy completion

    /// Should claim runs of dirty chunks (clearing their bits before the copy), avoid chunks
    /// in flight or awaited by a write, and bound the bytes in flight by buf-size.
    @Test func iterationClaimsRunsAndRespectsTheBuffer() {
        var s = Self.state { $0.bufSize = 2 << 20 }  // one run: max(2M/16, 1M) = 1 MiB = 16 chunks
        s.dirty.setAll()
        #expect(s.step(now: 0) == .wakeCopiers)
        #expect(s.queue == [CopyOperation(chunks: 0..<16, offset: 0, length: 1 << 20)])
        #expect(!s.dirty.isDirty(0) && s.inFlight.isDirty(15) && !s.inFlight.isDirty(16))
        #expect(s.step(now: 0) == .wakeCopiers)
        #expect(s.queue.last == CopyOperation(chunks: 16..<32, offset: 1 << 20, length: 1 << 20))
        // 2 MiB in flight = buf-size: no third run.
        #expect(s.step(now: 0) == .wait(until: MirrorState.sliceTime))
        #expect(s.backgroundOps == 2 && s.bytesInFlight == 2 << 20)

        // A write-blocking write waiting for chunk 40 cuts the next run short of it.
        var t = Self.state()
        t.dirty.setAll()
        t.waitingActive = [40..<41]
        t.cursor = 32
        let claimed = t.iterate()
        #expect(claimed)
        #expect(t.queue.last?.chunks == 32..<40)
        // And a run never starts on it.
        let next = t.iterate()
        #expect(!next)
        #expect(t.cursor == 41)
    }

    /// Should count a finished copy, release its chunks and reset the back-off; a failed
    /// one re-dirties its chunks and goes to the error policy.
    @Test(arguments: [
        CopyCase(failure: nil, policy: .report, expectError: nil, events: []),
        CopyCase(failure: CopyFailure(isRead: true, error: .ioError), policy: .report,
                 expectError: "Input/output error", events: ["BLOCK_JOB_ERROR"]),
        CopyCase(failure: CopyFailure(isRead: false, error: .noSpace), policy: .stop,
                 expectError: nil, events: ["BLOCK_JOB_ERROR"]),
        CopyCase(failure: CopyFailure(isRead: false, error: .ioError), policy: .ignore,
                 expectError: nil, events: ["BLOCK_JOB_ERROR"]),
    ])
    func copyCompletion(_ c: CopyCase) {
        var s = Self.state { $0.onSourceError = c.policy; $0.onTargetError = c.policy }
        s.markDirty(offset: 0, length: 1 << 20)
        s.activelySynced = true
        #expect(s.step(now: 10) == .wakeCopiers)
        let op = s.queue.removeFirst()
        s.retryBackoff = 0.5
        s.copyDone(op, failure: c.failure, now: 10)
        #expect(s.backgroundOps == 0 && s.bytesInFlight == 0 && !s.inFlight.isDirty(0))
        #expect(Self.names(s.outbox) == c.events)
        #expect(s.error == c.expectError)
        guard let failure = c.failure else {
            #expect(s.progressCurrent == 1 << 20 && s.retryBackoff == 0.05 && s.dirty.dirtyChunks == 0)
            return
        }
        #expect(s.dirty.dirtyBytes == 1 << 20, "a failed copy's chunks are dirty again")
        #expect(!s.activelySynced)
        #expect(s.outbox.last?.kind == .error(device: "job0", operation: failure.isRead ? "read" : "write", action: c.policy))
        switch c.policy {
        case .report:
            #expect(s.step(now: 10) == .exit(.failed("Input/output error")))
        case .stop:
            #expect(s.userPaused && s.ioStatus == .nospace)
            #expect(s.step(now: 10) == .publish)  // running → paused, queued
            #expect(s.status == .paused)
        case .ignore:
            // Backed off: no new copy before retryAt; the back-off doubles up to 1 s.
            #expect(s.retryAt == 10.5 && s.retryBackoff == 1)
            s.outbox.removeAll()
            #expect(s.step(now: 10.25) == .wait(until: 10.5))
            #expect(!s.targetUsable(now: 10.25))
            #expect(s.step(now: 10.5) == .wakeCopiers)
        }
    }

    // MARK: - Readiness and actively-synced

    /// Should be ready only after the last copy finished and the target was flushed, with
    /// nothing dirtied meanwhile; a failed flush goes to the error policy instead.
    @Test func readinessRule() {
        var s = Self.state()
        s.markDirty(offset: 0, length: 4096)
        #expect(s.step(now: 0) == .wakeCopiers)
        let op = s.queue.removeFirst()
        #expect(s.step(now: 0) == .wait(until: MirrorState.sliceTime), "not ready with a copy in flight")
        s.copyDone(op, failure: nil, now: 0)
        #expect(s.step(now: 0) == .flushTarget(.ready))
        // A write dirtied a chunk while the flush ran: not ready yet.
        s.markDirty(offset: 1 << 20, length: 1)
        s.targetFlushed(.ready, error: nil, now: 0)
        #expect(s.status == .running && !s.synced)
        s.dirty.clear(0..<s.dirty.chunkCount)
        s.targetFlushed(.ready, error: nil, now: 0)
        #expect(s.status == .ready && s.synced)
        #expect(Self.names(s.outbox) == ["JSC ready", "BLOCK_JOB_READY"])

        var f = Self.state()
        #expect(f.step(now: 0) == .flushTarget(.ready))
        f.targetFlushed(.ready, error: .ioError, now: 0)
        #expect(f.status == .running && f.error == "Input/output error")
        #expect(f.step(now: 0) == .exit(.failed("Input/output error")))
    }

    /// Should call the job actively synced only in write-blocking mode, clean, with no
    /// write that missed the mirror (a write that saw background mode just before the
    /// switch); mirrored writes on their way do not stand in the way (none returns before
    /// the target has it).
    @Test(arguments: [
        SyncCase(copyMode: .writeBlocking, expected: true),
        SyncCase(copyMode: .background, expected: false),
        SyncCase(copyMode: .writeBlocking, unmirroredWrites: 1, expected: false),
        SyncCase(copyMode: .writeBlocking, activeBytes: 4096, expected: true),  // a mirrored write on its way
        SyncCase(copyMode: .writeBlocking, ioStatus: .failed, expected: false),
        SyncCase(copyMode: .writeBlocking, dirty: true, expected: false),
    ])
    func activelySyncedRule(_ c: SyncCase) {
        var s = Self.readyState(copyMode: c.copyMode)
        s.unmirroredWrites = c.unmirroredWrites
        s.activeBytesInFlight = c.activeBytes
        s.ioStatus = c.ioStatus
        if c.dirty { s.markDirty(offset: 0, length: 1) }
        let step = s.step(now: 0)
        #expect(s.activelySynced == c.expected)
        // Waiters (status --watch, tests) are woken when it turns true.
        if c.expected { #expect(step == .publish) }
    }

    /// Should switch a background write that arrives after the switch to write-blocking
    /// to a mirrored one, and hold actively-synced false while one admitted before is open.
    @Test func aWriteAcrossTheSwitchHoldsActivelySyncedFalse() throws {
        var s = Self.readyState()
        guard case .admitted(var before) = s.admitWrite(offset: 0, length: 4096, now: 0) else { Issue.record("not admitted"); return }
        #expect(!before.mirrored)
        _ = try s.apply(.change(.writeBlocking))
        for _ in 0..<3 { _ = s.step(now: 0) }
        #expect(!s.activelySynced, "actively synced while a write is not on the target")
        s.sourceWritten(&before, succeeded: true, now: 0)
        #expect(s.dirty.isDirty(0))
        s.activeWriteSettle(before, targetFailure: nil, now: 0)
        #expect(s.step(now: 0) == .wakeCopiers)
        s.copyDone(s.queue.removeFirst(), failure: nil, now: 0)
        #expect(s.step(now: 0) == .publish)
        #expect(s.activelySynced)
        guard case .admitted(let after) = s.admitWrite(offset: 0, length: 4096, now: 0) else { Issue.record("not admitted"); return }
        #expect(after.mirrored)
    }

    // MARK: - Write path (active_write_prepare, do_sync_target_write, active_write_settle)

    /// Should send the target what the copier will not: head and tail inside chunks that
    /// are still dirty are left to it.
    @Test(arguments: [
        // (offset, length, dirty chunks) → target part
        HeadTailCase(offset: 0, length: 65536, dirtyChunks: [], part: 0..<65536),
        HeadTailCase(offset: 100, length: 1000, dirtyChunks: [], part: 0..<1000),
        HeadTailCase(offset: 100, length: 1000, dirtyChunks: [0], part: 0..<0),
        HeadTailCase(offset: 65536 - 100, length: 65536, dirtyChunks: [0], part: 100..<65536),
        HeadTailCase(offset: 65536 - 100, length: 65536, dirtyChunks: [1], part: 0..<100),
        HeadTailCase(offset: 65536, length: 65536 + 100, dirtyChunks: [2], part: 0..<65536),
        HeadTailCase(offset: 65536 - 100, length: 65536 + 200, dirtyChunks: [0, 2], part: 100..<65636),
        HeadTailCase(offset: size - 100, length: 100, dirtyChunks: [63], part: 0..<0),
    ])
    func headAndTailRule(_ c: HeadTailCase) {
        var s = Self.readyState(copyMode: .writeBlocking)
        for chunk in c.dirtyChunks { s.dirty.set(chunk..<(chunk + 1)) }
        guard case .admitted(var op) = s.admitWrite(offset: c.offset, length: c.length, now: 0) else {
            Issue.record("not admitted")
            return
        }
        let claimed = s.claimChunks(&op)
        #expect(op.mirrored && claimed)
        s.sourceWritten(&op, succeeded: true, now: 0)
        #expect(op.targetPart == c.part)
        // Chunks the target part covers whole are clean now; the others stay dirty.
        for chunk in c.dirtyChunks {
            let start = UInt64(chunk) * Self.granularity
            let covered = c.offset + UInt64(c.part.lowerBound) <= start
                && start + Self.granularity <= c.offset + UInt64(c.part.upperBound)
            #expect(s.dirty.isDirty(chunk) == !covered, "chunk \(chunk)")
        }
        s.activeWriteSettle(op, targetFailure: nil, now: 0)
        #expect(s.filterWrites == 0 && s.activeBytesInFlight == 0 && s.inFlight.dirtyChunks == 0)
        #expect(s.progressCurrent == UInt64(c.part.count))
    }

    /// Should wait for the whole range of a mirrored write (fresh data reaches the target
    /// after any older copy of the same chunks) and keep background runs off it meanwhile.
    @Test func aMirroredWriteWaitsForItsWholeRange() {
        var s = Self.readyState(copyMode: .writeBlocking)
        s.inFlight.set(3..<4)
        guard case .admitted(var op) = s.admitWrite(offset: 0, length: 4 * Self.granularity, now: 0) else {
            Issue.record("not admitted")
            return
        }
        let early = s.claimChunks(&op)
        #expect(!early)
        s.dirty.setAll()
        let iterated = s.iterate()
        #expect(!iterated, "a background run took a chunk a write waits for")
        s.inFlight.clear(3..<4)
        let claimed = s.claimChunks(&op)
        #expect(claimed && s.waitingActive.isEmpty && s.inFlight.dirtyChunks == 4)
    }

    /// Should decide once, at entry, whether a write is mirrored; hold writes while the job
    /// converges or lets go; send them away once it has let go.
    @Test(arguments: [
        AdmitCase("write-blocking", { _ in }, mirrored: true),
        AdmitCase("background", { $0.copyMode = .background }, mirrored: false),
        AdmitCase("failed", { $0.error = "Input/output error" }, mirrored: false),
        AdmitCase("force-cancelled", { $0.pendingExit = .forceCancel(keepLog: false) }, mirrored: false),
        AdmitCase("stopped by a target error", { $0.ioStatus = .failed }, mirrored: false),
        AdmitCase("backing off", { $0.retryAt = 5 }, mirrored: false),
        AdmitCase("held", { $0.writeGate = .held }, admission: .held),
        AdmitCase("detached", { $0.writeGate = .closed }, admission: .detached),
    ])
    func writeAdmission(_ c: AdmitCase) {
        var s = Self.readyState(copyMode: .writeBlocking)
        s.activelySynced = true
        c.setup(&s)
        let admission = s.admitWrite(offset: 0, length: 4096, now: 1)
        guard case .admitted(var op) = admission else {
            #expect(admission == c.admission, "\(c.name)")
            #expect(s.filterWrites == 0)
            return
        }
        #expect(c.admission == nil, "\(c.name)")
        #expect(op.mirrored == c.mirrored, "\(c.name)")
        #expect(s.filterWrites == 1)
        #expect(s.activelySynced == c.mirrored, "\(c.name): a write not mirrored clears actively-synced")
        if !op.mirrored {
            s.sourceWritten(&op, succeeded: true, now: 0)
            #expect(s.dirty.isDirty(0) && s.unmirroredWrites == 0 && op.targetPart.isEmpty)
        }
    }

    struct WriteThroughCase: CustomStringConvertible, Sendable {
        let name: String
        let setup: @Sendable (inout MirrorState) -> Void
        let offset: UInt64
        let writesThrough: Bool
        var description: String { name }
        init(_ name: String, offset: UInt64 = 4096, _ setup: @escaping @Sendable (inout MirrorState) -> Void = { _ in },
             writesThrough: Bool) {
            (self.name, self.offset, self.setup, self.writesThrough) = (name, offset, setup, writesThrough)
        }
    }

    /// Should write a background write through to the target only after ready, into chunks
    /// nothing holds, with part of it in clean chunks; otherwise mark it dirty as before.
    @Test(arguments: [
        WriteThroughCase("ready, clean", writesThrough: true),
        WriteThroughCase("not ready yet", { $0.synced = false }, writesThrough: false),
        WriteThroughCase("chunk in flight", { $0.inFlight.set(0..<1) }, writesThrough: false),
        WriteThroughCase("inside a dirty chunk (left to the copier)", { $0.dirty.set(0..<1) }, writesThrough: false),
        WriteThroughCase("paused", { $0.userPaused = true }, writesThrough: false),
        WriteThroughCase("failed", { $0.error = "Input/output error" }, writesThrough: false),
        WriteThroughCase("completing", { $0.pendingExit = .complete }, writesThrough: false),
        WriteThroughCase("backing off", { $0.retryAt = 5 }, writesThrough: false),
        WriteThroughCase("the mount ends", { $0.shuttingDown = true }, writesThrough: false),
        WriteThroughCase("queue full", { $0.writeThroughs = WriteThroughQueue.depth }, writesThrough: false),
    ])
    func writeThrough(_ c: WriteThroughCase) {
        var s = Self.readyState()
        c.setup(&s)
        let before = s.writeThroughs
        guard case .admitted(var op) = s.admitWrite(offset: c.offset, length: 4096, now: 1, canWriteThrough: true) else {
            Issue.record("not admitted")
            return
        }
        #expect(op.writeThrough == c.writesThrough && !op.mirrored, "\(c.name)")
        s.sourceWritten(&op, succeeded: true, now: 1)
        if c.writesThrough {
            #expect(op.targetPart == 0..<4096 && s.inFlight.isDirty(0) && !s.dirty.isDirty(0) && s.writeThroughs == 1)
            s.activeWriteSettle(op, targetFailure: nil, now: 1)
            #expect(s.inFlight.dirtyChunks == 0 && !s.dirty.isDirty(0) && s.writeThroughs == 0 && s.filterWrites == 0)
            #expect(s.progressCurrent == 4096)
        } else {
            #expect(s.dirty.isDirty(0) && s.writeThroughs == before && s.unmirroredWrites == 0, "\(c.name)")
            s.activeWriteSettle(op, targetFailure: nil, now: 1)
            #expect(s.filterWrites == 0 && (c.name != "chunk in flight" || s.inFlight.isDirty(0)), "\(c.name)")
        }
    }

    /// Should treat a written-through part like a mirrored one when it fails (dirty again,
    /// the error policy) or when it never went out (dirty again, no error); a failed source
    /// write leaves the whole range to the copier; actively-synced waits for those in flight.
    @Test func writeThroughFailures() {
        var s = Self.readyState { $0.onTargetError = .stop }
        guard case .admitted(var op) = s.admitWrite(offset: 0, length: 4096, now: 0, canWriteThrough: true) else { return }
        s.sourceWritten(&op, succeeded: true, now: 0)
        s.activeWriteSettle(op, targetFailure: .noSpace, now: 0)
        #expect(s.dirty.isDirty(0) && s.ioStatus == .nospace && s.userPaused && s.writeThroughs == 0)
        #expect(Self.names(s.outbox) == ["BLOCK_JOB_ERROR"])

        var t = Self.readyState()
        guard case .admitted(var unsent) = t.admitWrite(offset: 0, length: 4096, now: 0, canWriteThrough: true) else { return }
        t.sourceWritten(&unsent, succeeded: true, now: 0)
        t.activeWriteSettle(unsent, targetFailure: nil, notWritten: true, now: 0)
        #expect(t.dirty.isDirty(0) && t.outbox.isEmpty && t.writeThroughs == 0 && t.inFlight.dirtyChunks == 0)

        var u = Self.readyState()
        guard case .admitted(var failedSource) = u.admitWrite(offset: 0, length: 4096, now: 0, canWriteThrough: true) else { return }
        u.sourceWritten(&failedSource, succeeded: false, now: 0)
        #expect(u.dirty.isDirty(0))

        // Switched to write-blocking with a write-through in flight: not synced until reaped.
        var v = Self.readyState()
        guard case .admitted(var inFlight) = v.admitWrite(offset: 0, length: 4096, now: 0, canWriteThrough: true) else { return }
        v.sourceWritten(&inFlight, succeeded: true, now: 0)
        v.copyMode = .writeBlocking
        _ = v.step(now: 0)
        #expect(!v.activelySynced)
        let wake = v.activeWriteSettle(inFlight, targetFailure: nil, now: 0)
        #expect(wake.contains(.job))
        _ = v.step(now: 0)
        #expect(v.activelySynced)
    }

    /// Should never tell the user about the target: a failed target part is dirty again and
    /// goes to the error policy; a failed source write leaves the whole range to the copier.
    @Test func writeFailures() {
        var s = Self.readyState(copyMode: .writeBlocking) { $0.onTargetError = .stop }
        s.activelySynced = true
        guard case .admitted(var op) = s.admitWrite(offset: 0, length: 65536, now: 0) else { Issue.record("not admitted"); return }
        let claimed = s.claimChunks(&op)
        #expect(claimed)
        s.sourceWritten(&op, succeeded: true, now: 0)
        s.activeWriteSettle(op, targetFailure: .ioError, now: 0)
        #expect(s.dirty.isDirty(0) && s.ioStatus == .failed && s.userPaused && !s.activelySynced)
        #expect(Self.names(s.outbox) == ["BLOCK_JOB_ERROR"])

        var t = Self.readyState(copyMode: .writeBlocking)
        t.activelySynced = true
        guard case .admitted(var failed) = t.admitWrite(offset: 100, length: 65536, now: 0) else { Issue.record("not admitted"); return }
        let claimedFailed = t.claimChunks(&failed)
        #expect(claimedFailed)
        // The target part was written alongside the source; the failed source write leaves
        // the whole range to the copier, so the target gets what the source holds.
        #expect(failed.targetPart == 0..<65536)
        t.sourceWritten(&failed, succeeded: false, now: 0)
        #expect(t.dirty.isDirty(0) && t.dirty.isDirty(1) && !t.activelySynced)
        t.activeWriteSettle(failed, targetFailure: nil, now: 0)
        #expect(t.outbox.isEmpty && t.error == nil && t.inFlight.dirtyChunks == 0)
    }

    // MARK: - Rate limit and the log's sweep (manual time)

    /// Should start copies at `speed` (one slice of burst) before ready, and without limit after.
    @Test func speedLimitsCopiesBeforeReadyOnly() {
        var s = Self.state(speed: 1 << 20)
        s.dirty.setAll()
        #expect(s.step(now: 0) == .wakeCopiers)  // 1 MiB: the allowance goes to -1 MiB
        #expect(s.step(now: 0) == .wait(until: 1.0))
        #expect(s.step(now: 0.5) == .wait(until: 1.0))
        #expect(s.step(now: 1.0) == .wakeCopiers)
        #expect(s.step(now: 1.0) == .wait(until: 2.0))
        s.synced = true
        #expect(s.step(now: 1.0) == .wakeCopiers, "no limit after ready")
    }

    /// Should sweep the log every interval, and never while the mount ends.
    @Test func theLogIsSweptEveryInterval() {
        var s = Self.readyState(log: true)
        #expect(s.step(now: 4.5) == .wait(until: 4.5 + MirrorState.sliceTime))
        #expect(s.step(now: DirtyLog.sweepInterval) == .sweepLog)
        #expect(s.step(now: DirtyLog.sweepInterval + 1) != .sweepLog)
        #expect(s.step(now: 2 * DirtyLog.sweepInterval) == .sweepLog)
        s.shutDown()
        #expect(s.step(now: 10 * DirtyLog.sweepInterval) != .sweepLog)
        // Only regions whose chunks are all clean and idle are candidates.
        var t = Self.readyState(log: true)
        t.inFlight.set(0..<1)
        #expect(t.cleanRegions([0]) == [])
        t.inFlight.clear(0..<1)
        #expect(t.cleanRegions([0]) == [0])
    }

    // MARK: - Forecast (SPEC 10)

    /// Should give the rate over the last 10 s, or over the job's life when it is younger.
    @Test func rateWindow() {
        var w = RateWindow()
        w.add(1 << 20, now: 0.5)
        #expect(w.rate(now: 1.0, since: 0) == Double(1 << 20))
        #expect(w.rate(now: 20, since: 0) == 0, "bytes older than the window count")
        var steady = RateWindow()
        for second in 0..<16 { steady.add(1 << 20, now: Double(second) + 0.5) }
        let rate = steady.rate(now: 15.9, since: 0)
        #expect(abs(rate - Double(1 << 20)) < 0.1 * Double(1 << 20), "\(rate)")
    }

    /// Should count only the chunks a user's write turned from clean to dirty.
    @Test func theDirtyRateCountsCleanChunksDirtied() {
        var s = Self.state()
        s.markDirty(offset: 0, length: 1)
        s.userDirtied(0..<2, now: 0.5)
        #expect(s.dirtyWindow.rate(now: 1, since: 0) == Double(Self.granularity))
    }

    /// Should forecast from what is left and the two rates: converging when the copy gains
    /// on the writes by a margin, with the time to go; never while paused.
    @Test(arguments: [
        ForecastCase("copying, no writes", copied: 1 << 20, dirtied: 0, converging: true, eta: 2),
        ForecastCase("copying, writes as fast", copied: 1 << 20, dirtied: 1 << 20, converging: false, eta: nil),
        ForecastCase("copying, writes just slower (inside the margin)", copied: 1 << 20, dirtied: 1_020_000, converging: false, eta: nil),
        ForecastCase("copying twice as fast as the writes", copied: 2 << 20, dirtied: 1 << 20, converging: true, eta: 2),
        ForecastCase("nothing copied yet", copied: 0, dirtied: 0, converging: false, eta: nil),
        ForecastCase("paused", copied: 1 << 20, dirtied: 0, paused: true, converging: false, eta: nil),
        ForecastCase("nothing left", copied: 1 << 20, dirtied: 1 << 20, left: 0, converging: true, eta: 0),
    ])
    func forecast(_ c: ForecastCase) {
        var s = Self.state()
        if c.left > 0 { s.markDirty(offset: 0, length: c.left) }
        s.copyWindow.add(c.copied, now: 0.5)
        s.dirtyWindow.add(c.dirtied, now: 0.5)
        s.userPaused = c.paused
        let f = s.forecast(now: 1.0)
        #expect(f.converging == c.converging, "\(c.name)")
        #expect(f.etaSeconds == c.eta, "\(c.name)")
        #expect(f.copyRate == Double(c.copied) && f.dirtyRate == Double(c.dirtied), "\(c.name)")
        let info = s.info(now: 1.0, dirtyLog: nil)
        #expect(info.forecast == f)
    }

    /// Should switch a background job that has not converged for the option's time to
    /// write-blocking, once, with an event; never without the option, and never while paused.
    @Test func autoWriteBlockingSwitchesAJobThatDoesNotConverge() throws {
        var s = Self.state { $0.autoWriteBlockingAfter = 5 }
        s.dirty.setAll()
        s.dirtyWindow.add(8 << 20, now: 0.5)  // writes dirty faster than anything is copied
        _ = s.step(now: 1)
        #expect(s.notConvergingSince == 1)
        _ = s.step(now: 5.9)
        #expect(s.copyMode == .background)
        _ = s.step(now: 6)
        #expect(s.copyMode == .writeBlocking)
        let event = s.outbox.first { $0.name == "__org.mirrorfs_BLOCK_JOB_AUTO_WRITE_BLOCKING" }
        #expect(event?.data["copy-mode"] == .string("write-blocking"))
        #expect(event?.data["device"] == .string("job0"))
        // Converging meanwhile resets the clock.
        var t = Self.state { $0.autoWriteBlockingAfter = 5 }
        t.markDirty(offset: 0, length: 1 << 20)
        _ = t.step(now: 1)
        t.copyWindow.add(64 << 20, now: 2.5)
        _ = t.step(now: 3)
        #expect(t.notConvergingSince == nil)
        // Without the option, or paused: never.
        var u = Self.state()
        u.dirty.setAll()
        u.dirtyWindow.add(8 << 20, now: 0.5)
        for now in stride(from: 1.0, through: 30, by: 1) { _ = u.step(now: now) }
        #expect(u.copyMode == .background)
        var v = Self.state { $0.autoWriteBlockingAfter = 5 }
        v.dirty.setAll()
        _ = try v.apply(.pause)
        for now in stride(from: 1.0, through: 30, by: 1) { _ = v.step(now: now) }
        #expect(v.copyMode == .background)
    }

    // MARK: - Pause point

    /// Should pause after background I/O is done (running → paused, ready → standby) and go
    /// back on resume; an error while paused waits for the resume.
    @Test(arguments: [JobStatus.running, .ready])
    func pausePoint(from status: JobStatus) throws {
        var s = Self.state(status: status, synced: status == .ready)
        s.backgroundOps = 1
        _ = try s.apply(.pause)
        #expect(s.step(now: 0) == .wait(until: nil))
        #expect(s.status == status, "paused with I/O in flight")
        s.backgroundOps = 0
        #expect(s.step(now: 0) == .publish)
        #expect(s.status == (status == .ready ? .standby : .paused) && !s.busy)
        s.outbox.removeAll()
        s.error = "Input/output error"
        #expect(s.step(now: 0) == .wait(until: nil))
        _ = try s.apply(.resume)
        #expect(s.step(now: 0) == .exit(.failed("Input/output error")))
        #expect(s.status == status)
    }

    // MARK: - Convergence and exit

    /// Should converge (hold writes, drain them, flush, record, exit) on complete, and let
    /// writes through again when the convergence cannot go on.
    @Test func completionConvergesStepByStep() throws {
        var s = Self.readyState(log: true)
        s.filterWrites = 1
        _ = try s.apply(.complete)
        #expect(s.step(now: 1) == .wait(until: nil))
        #expect(s.writeGate == .held && s.convergence == .draining)
        s.filterWrites = 0
        #expect(s.step(now: 1) == .flushTarget(.completion))
        s.targetFlushed(.completion, error: nil, now: 1)
        #expect(s.step(now: 1) == .recordCompletion)
        s.completionRecorded(error: nil, now: 1)
        // Recorded: the source is stale; a pause or an error no longer stops the pivot.
        _ = try s.apply(.pause)
        #expect(s.step(now: 1) == .exit(.converged))
        #expect(s.writeGate == .held)
    }

    @Test(arguments: [
        ConvergeCase("new dirt after the drain", { $0.markDirty(offset: 0, length: 1) }),
        ConvergeCase("the mount ends", { $0.shuttingDown = true }),
        ConvergeCase("a forced cancel", { $0.pendingExit = .forceCancel(keepLog: false) }),
    ])
    func convergenceThatCannotGoOnReleasesTheWrites(_ c: ConvergeCase) throws {
        var s = Self.readyState()
        s.filterWrites = 1
        _ = try s.apply(.cancel(force: false))
        #expect(s.step(now: 0) == .wait(until: nil))
        s.filterWrites = 0
        c.change(&s)
        let step = s.step(now: 0)
        #expect(s.writeGate == .open && s.convergence == nil, "\(c.name)")
        #expect(step != .flushTarget(.completion), "\(c.name)")
    }

    /// Should finish a convergence under way despite a pause asked for meanwhile (the pause
    /// takes effect only if the job goes on).
    @Test func aPauseDoesNotStopAConvergenceUnderWay() throws {
        var s = Self.readyState()
        s.filterWrites = 1
        _ = try s.apply(.complete)
        #expect(s.step(now: 0) == .wait(until: nil))
        _ = try s.apply(.pause)
        s.filterWrites = 0
        #expect(s.step(now: 0) == .flushTarget(.completion))
        s.targetFlushed(.completion, error: nil, now: 0)
        #expect(s.step(now: 0) == .exit(.converged))
    }

    /// Should end a job asked to force-cancel even when an error stop paused it again
    /// before the loop looked, and fail a job whose fatal error came before its pause took
    /// effect.
    @Test func aForcedCancelOrAnEarlierErrorIsNotHeldByAPause() throws {
        var s = Self.state { $0.onTargetError = .stop }
        _ = try s.apply(.cancel(force: true))
        s.errorAction(isRead: false, error: .noSpace, now: 0)  // a copy that was in flight
        #expect(s.userPaused)
        #expect(s.step(now: 0) == .exit(.cancelled))

        var t = Self.state()
        t.backgroundOps = 1
        _ = try t.apply(.pause)
        t.error = "Input/output error"
        #expect(t.step(now: 0) == .exit(.failed("Input/output error")))
        #expect(t.status == .running)
    }

    /// Should not flush for ready (or converge) while backing off after an ignored error.
    @Test func theBackOffHoldsTheReadyFlush() {
        var s = Self.state { $0.onTargetError = .ignore }
        s.errorAction(isRead: false, error: .ioError, now: 0)
        s.outbox.removeAll()
        #expect(s.step(now: 0.01) == .wait(until: 0.05))
        #expect(s.step(now: 0.05) == .flushTarget(.ready))
    }

    /// Should keep the log once asked to, whatever cancel follows.
    @Test func keepingTheLogSticks() throws {
        var s = Self.state()
        _ = try s.apply(.cancel(force: true, keepLog: true))
        _ = try s.apply(.cancel(force: true))
        #expect(s.pendingExit == .forceCancel(keepLog: true))
    }

    /// Should not pivot when the flush or the completion record fails: the error policy decides.
    @Test func aFailedFlushOrRecordDoesNotPivot() throws {
        var s = Self.readyState(log: true)
        _ = try s.apply(.complete)
        #expect(s.step(now: 0) == .flushTarget(.completion))
        s.targetFlushed(.completion, error: .ioError, now: 0)
        #expect(s.writeGate == .open && s.step(now: 0) == .exit(.failed("Input/output error")))

        var t = Self.readyState(log: true) { $0.onTargetError = .stop }
        _ = try t.apply(.complete)
        #expect(t.step(now: 0) == .flushTarget(.completion))
        t.targetFlushed(.completion, error: nil, now: 0)
        #expect(t.step(now: 0) == .recordCompletion)
        t.completionRecorded(error: .noSpace, now: 0)
        #expect(t.writeGate == .open && t.ioStatus == .nospace)
        #expect(t.step(now: 0) == .publish)
        #expect(t.status == .standby)
    }

    /// Should end each way with QEMU's events and status sequence, and wait for finalize and
    /// dismiss when they are not automatic.
    @Test(arguments: [
        ExitCase(outcome: .converged, exit: .complete, ending: .pivoted,
                 events: ["JSC waiting", "JSC pending", "BLOCK_JOB_COMPLETED", "JSC concluded"]),
        ExitCase(outcome: .converged, exit: .cancel, ending: .converged,
                 events: ["JSC waiting", "JSC pending", "BLOCK_JOB_COMPLETED", "JSC concluded"]),
        ExitCase(outcome: .cancelled, exit: .forceCancel(keepLog: false), ending: .cancelled,
                 events: ["JSC aborting", "BLOCK_JOB_CANCELLED", "JSC concluded"]),
        ExitCase(outcome: .failed("Input/output error"), exit: nil, ending: .failed,
                 events: ["JSC aborting", "BLOCK_JOB_COMPLETED", "JSC concluded"]),
    ])
    func exitSequences(_ c: ExitCase) {
        var s = Self.readyState(log: true)
        s.pendingExit = c.exit
        s.loopEnded(c.outcome)
        #expect(s.ending() == c.ending)
        #expect(s.holdWritesForLetGo(c.ending).isDone(c.ending.retiresLog))
        s.letGoDone()
        s.conclude(c.ending)
        #expect(Self.names(s.outbox) == c.events)
        #expect(s.status == .concluded && s.writeGate == .closed && s.awaiting == nil)
        if case .failed = c.outcome {
            #expect(s.outbox.last { $0.name == "BLOCK_JOB_COMPLETED" }?.data["error"] == .string("Input/output error"))
        }
    }

    @Test func finalizeAndDismissAreAwaitedWhenNotAutomatic() throws {
        var s = Self.readyState { $0.autoFinalize = false; $0.autoDismiss = false }
        s.pendingExit = .complete
        s.loopEnded(.converged)
        #expect(Self.names(s.outbox) == ["JSC waiting", "JSC pending", "BLOCK_JOB_PENDING"])
        #expect(s.ending() == nil)
        _ = try s.apply(.finalize)
        #expect(s.ending() == .pivoted)
        s.conclude(.pivoted)
        #expect(s.awaiting == .dismiss)
        _ = try s.apply(.dismiss)
        #expect(s.awaiting == nil)

        // A forced cancel in pending aborts instead.
        var t = Self.readyState { $0.autoFinalize = false }
        t.pendingExit = .complete
        t.loopEnded(.converged)
        _ = try t.apply(.cancel(force: true))
        #expect(t.ending() == .cancelled)
    }

    /// Should keep the log of a mount that did not come up, and retire a cancelled job's.
    @Test func aCancelRetiresTheLogUnlessAskedToKeepIt() {
        var s = Self.state(log: true)
        s.pendingExit = .forceCancel(keepLog: true)
        #expect(s.holdWritesForLetGo(.cancelled).isDone(false))
        s.pendingExit = .forceCancel(keepLog: false)
        #expect(s.holdWritesForLetGo(.cancelled).isDone(true))
        s.filterWrites = 1
        #expect(!s.holdWritesForLetGo(.cancelled).isDone(true), "let go with a write inside")
    }
}

// MARK: - Table rows

/// The fields a verb may change.
struct Snapshot: Equatable {
    let status: JobStatus, userPaused: Bool, pendingExit: PendingExit?, speed: UInt64, copyMode: CopyMode
    let ioStatus: IOStatus, awaiting: JobVerb?
    init(_ s: MirrorState) {
        status = s.status; userPaused = s.userPaused; pendingExit = s.pendingExit; speed = s.speed
        copyMode = s.copyMode; ioStatus = s.ioStatus; awaiting = s.awaiting
    }
}

struct VerbCase: Sendable, CustomTestStringConvertible {
    let name: String
    let setup: @Sendable (inout MirrorState) -> Void
    let request: VerbRequest
    let error: String?
    let check: @Sendable (MirrorState) -> Bool
    init(_ name: String, _ setup: @escaping @Sendable (inout MirrorState) -> Void, _ request: VerbRequest,
         error: String? = nil, check: @escaping @Sendable (MirrorState) -> Bool = { _ in true }) {
        self.name = name; self.setup = setup; self.request = request; self.error = error; self.check = check
    }
    var testDescription: String { name }
}

struct CopyCase: Sendable {
    let failure: CopyFailure?
    let policy: ErrorPolicy
    let expectError: String?
    let events: [String]
}

struct SyncCase: Sendable {
    var copyMode: CopyMode
    var unmirroredWrites = 0
    var activeBytes: UInt64 = 0
    var ioStatus: IOStatus = .ok
    var dirty = false
    var expected: Bool
}

struct HeadTailCase: Sendable {
    let offset: UInt64
    let length: UInt64
    let dirtyChunks: [Int]
    let part: Range<UInt64>
}

struct AdmitCase: Sendable, CustomTestStringConvertible {
    let name: String
    let setup: @Sendable (inout MirrorState) -> Void
    var mirrored = false
    var admission: WriteAdmission?
    init(_ name: String, _ setup: @escaping @Sendable (inout MirrorState) -> Void, mirrored: Bool = false,
         admission: WriteAdmission? = nil) {
        self.name = name; self.setup = setup; self.mirrored = mirrored; self.admission = admission
    }
    var testDescription: String { name }
}

struct ConvergeCase: Sendable, CustomTestStringConvertible {
    let name: String
    let change: @Sendable (inout MirrorState) -> Void
    init(_ name: String, _ change: @escaping @Sendable (inout MirrorState) -> Void) { self.name = name; self.change = change }
    var testDescription: String { name }
}

struct ForecastCase: Sendable, CustomTestStringConvertible {
    let name: String
    let copied: UInt64
    let dirtied: UInt64
    var paused = false
    var left: UInt64 = 2 << 20
    let converging: Bool
    let eta: Double?
    init(_ name: String, copied: UInt64, dirtied: UInt64, paused: Bool = false, left: UInt64 = 2 << 20,
         converging: Bool, eta: Double?) {
        self.name = name; self.copied = copied; self.dirtied = dirtied; self.paused = paused; self.left = left
        self.converging = converging; self.eta = eta
    }
    var testDescription: String { name }
}

struct ExitCase: Sendable {
    let outcome: JobOutcome
    let exit: PendingExit?
    let ending: Ending
    let events: [String]
}

extension ConditionLock.Decision {
    func isDone(_ expected: R) -> Bool where R: Equatable {
        if case .done(let value) = self { return value == expected }
        return false
    }
}
