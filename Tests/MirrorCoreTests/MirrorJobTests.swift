import Foundation
import MirrorCore
import Synchronization
import SystemPackage
import XCTest

/// Collects a job's events so tests can wait for them (woken by each event, never polling).
final class EventRecorder: Sendable {
    private let events = ConditionLock<[JobEvent]>([])
    var all: [JobEvent] { events.withLock { $0 } }
    func record(_ event: JobEvent) {
        events.withLock { $0.append(event) }
        events.broadcast()
    }

    func names() -> [String] { Self.names(all) }

    static func names(_ events: [JobEvent]) -> [String] {
        events.map { e in
            if case let .statusChange(_, status) = e.kind { return "JSC " + status.rawValue }
            return e.name
        }
    }

    /// Waits until `count` events named `name` were recorded.
    @discardableResult
    func wait(for name: String, count: Int = 1, timeout: TimeInterval = 30,
              file: StaticString = #filePath, line: UInt = #line) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        let seen = events.withLock(waiting: { events -> ConditionLock<[JobEvent]>.Decision<Bool> in
            if Self.names(events).filter({ $0 == name }).count >= count { return .done(true) }
            let left = deadline.timeIntervalSinceNow
            return left > 0 ? .wait(timeout: left) : .done(false)
        })
        if !seen { XCTFail("no \(name) (×\(count)) within \(timeout) s; saw \(names())", file: file, line: line) }
        return seen
    }
}

final class MirrorJobTests: XCTestCase {
    private func makeFilter(size: UInt64, fill: Bool = true, seed: UInt64) -> (MirrorFilter, MemoryBlockDevice) {
        let source = MemoryBlockDevice(size: size)
        var rng = SeededGenerator(seed: seed)
        if fill {
            // Scattered data with holes between.
            var offset: UInt64 = 0
            while offset < size {
                let length = min(UInt64.random(in: 1...200_000, using: &rng), size - offset)
                if Bool.random(using: &rng) {
                    let data = (0..<Int(length)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                    try! data.withUnsafeBytes { try source.write($0, at: offset, cache: .cached) }
                }
                offset += length + UInt64.random(in: 0...100_000, using: &rng)
            }
        }
        return (MirrorFilter(source: source, readOnly: false), source)
    }

    /// Starts a 64 KiB write of `byte` through `filter` and returns once it is held inside
    /// `source`'s write: signal `proceed` to let it land; `written` is signalled when it returned.
    private func heldWrite(through filter: MirrorFilter, of source: MemoryBlockDevice, byte: UInt8, at offset: UInt64,
                           file: StaticString = #filePath, line: UInt = #line) -> (proceed: DispatchSemaphore, written: DispatchSemaphore) {
        let entered = DispatchSemaphore(value: 0), proceed = DispatchSemaphore(value: 0)
        source.gate.withLock { $0 = (entered, proceed) }
        let written = DispatchSemaphore(value: 0)
        Thread {
            let data = [UInt8](repeating: byte, count: 65536)
            _ = try? data.withUnsafeBytes { try filter.write($0, at: offset, cache: .cached) }
            written.signal()
        }.start()
        XCTAssertEqual(entered.wait(timeout: .now() + 10), .success, "the write never reached the source", file: file, line: line)
        return (proceed, written)
    }

    /// A write that found no job and is still on its way to the source when a job starts
    /// is seen by the job (QEMU drains before inserting its filter): the start waits for it,
    /// so the job's scan of a sparse source finds its data and the target gets it.
    func testAWriteInFlightWhenTheJobStartsReachesTheTarget() throws {
        let size: UInt64 = 4 << 20
        let source = MemoryBlockDevice(size: size)
        let filter = MirrorFilter(source: source, readOnly: false)
        let target = MemoryBlockDevice(size: size)
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        let (proceed, written) = heldWrite(through: filter, of: source, byte: 0xa7, at: 1 << 20)
        let options = { var o = MirrorOptions(jobID: "disk.raw"); o.targetIsZero = true; return o }()  // scans for data
        let started = DispatchSemaphore(value: 0)
        Thread {
            _ = try? filter.startMirror(to: target, options: options)
            started.signal()
        }.start()
        // The start waits for the write; a start that did not could scan and be ready by now.
        XCTAssertEqual(started.wait(timeout: .now() + 0.5), .timedOut, "the job started under a write in flight")
        proceed.signal()
        XCTAssertEqual(written.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(started.wait(timeout: .now() + 10), .success)
        recorder.wait(for: "BLOCK_JOB_READY")
        XCTAssertTrue(target.contents == source.contents, "the write in flight at the start is missing from the target")
        try filter.job?.cancel(force: false)
        recorder.wait(for: "JSC null")
    }

    /// A write the job took in background mode and that is still on its way to the source
    /// when the job switches to write-blocking holds actively-synced false until it is
    /// copied: the flag never claims a target that lacks it.
    func testAWriteInFlightAcrossTheSwitchToWriteBlockingHoldsActivelySyncedFalse() throws {
        let size: UInt64 = 4 << 20
        let source = MemoryBlockDevice(size: size)
        let filter = MirrorFilter(source: source, readOnly: false)
        let target = MemoryBlockDevice(size: size)
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        let job = try filter.startMirror(to: target, options: MirrorOptions(jobID: "disk.raw"))
        recorder.wait(for: "BLOCK_JOB_READY")
        let (proceed, written) = heldWrite(through: filter, of: source, byte: 0x5e, at: 2 << 20)
        try job.change(copyMode: .writeBlocking)
        // The job's loop looks every 0.1 s at least; it must not call this synced meanwhile.
        XCTAssertFalse(job.wait(timeout: 0.5) { $0.activelySynced }, "actively-synced while a write is not on the target")
        proceed.signal()
        XCTAssertEqual(written.wait(timeout: .now() + 10), .success)
        XCTAssertTrue(job.wait(timeout: 10) { $0.activelySynced })
        XCTAssertTrue(target.contents == source.contents, "the target differs")
        try job.cancel(force: false)
        recorder.wait(for: "JSC null")
    }

    /// Many threads write random (unaligned) ranges while the copier runs, the mode switches
    /// to write-blocking midway, and the job completes: target == source byte for byte.
    func testConcurrentWritersModeSwitchAndCompleteLeaveTargetIdentical() throws {
        for seed in UInt64(1)...8 {
            let size: UInt64 = 4 << 20
            let (filter, source) = makeFilter(size: size, seed: seed)
            let target = MemoryBlockDevice(size: size, yieldsMidWrite: true)
            let recorder = EventRecorder()
            filter.addEventListener { recorder.record($0) }
            var options = MirrorOptions(jobID: "disk.raw")
            options.granularity = [512, 4096, 65536][Int(seed % 3)]
            options.targetIsZero = true
            let job = try filter.startMirror(to: target, options: options)

            let writers = RandomWriters(filter: filter, size: size, count: 6, seed: seed * 100,
                                        maxLength: 70_000, allocationChanges: true)
            XCTAssertTrue(writers.wait(forWrites: 200), "seed \(seed): the writers did not write")
            try job.change(copyMode: .writeBlocking)
            recorder.wait(for: "BLOCK_JOB_READY")
            // Writes keep coming while actively-synced must turn true.
            XCTAssertTrue(job.wait(timeout: 20) { $0.activelySynced }, "seed \(seed): actively-synced never turned true")
            writers.stop()
            try job.complete()
            recorder.wait(for: "JSC null")
            XCTAssertTrue(filter.device === target, "after complete the image is served from the target")
            XCTAssertNil(job.info().error)
            XCTAssertEqual(target.contents, source.contents, "seed \(seed)")
            let names = recorder.names()
            XCTAssertEqual(Array(names.prefix(2)), ["JSC created", "JSC running"])
            XCTAssertEqual(Array(names.suffix(5)), ["JSC waiting", "JSC pending", "BLOCK_JOB_COMPLETED", "JSC concluded", "JSC null"])
        }
    }

    /// Writers keep going through complete: once the job is gone the source no longer
    /// changes and every write lands in the target.
    func testAfterPivotWritesGoToTheTargetOnly() throws {
        for seed in UInt64(20)...23 {
            let size: UInt64 = 2 << 20
            let (filter, source) = makeFilter(size: size, seed: seed)
            let target = MemoryBlockDevice(size: size, yieldsMidWrite: true)
            let recorder = EventRecorder()
            filter.addEventListener { recorder.record($0) }
            var options = MirrorOptions(jobID: "disk.raw")
            options.copyMode = .writeBlocking
            options.targetIsZero = true
            let job = try filter.startMirror(to: target, options: options)
            let writers = RandomWriters(filter: filter, size: size, count: 4, seed: seed * 31, maxLength: 50_000)
            recorder.wait(for: "BLOCK_JOB_READY")
            try job.complete()
            recorder.wait(for: "JSC null")
            let sourceAtEnd = source.contents
            let targetAtEnd = target.contents
            XCTAssertTrue(writers.wait(forWrites: writers.writes + 100), "seed \(seed): the writers stopped")
            writers.stop()
            XCTAssertEqual(source.contents, sourceAtEnd, "seed \(seed): the source changed after the pivot")
            XCTAssertNotEqual(target.contents, targetAtEnd, "seed \(seed): writes after the pivot reach the target")
            var readBack = [UInt8](repeating: 0, count: Int(size))
            _ = try readBack.withUnsafeMutableBytes { try filter.read(into: $0, at: 0, cache: .cached) }
            XCTAssertEqual(readBack, target.contents)
        }
    }

    func testCancelAfterReadyLeavesConsistentCopyWithoutPivot() throws {
        let (filter, source) = makeFilter(size: 1 << 20, seed: 5)
        let target = MemoryBlockDevice(size: 1 << 20)
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        let job = try filter.startMirror(to: target, options: MirrorOptions(jobID: "disk.raw"))
        recorder.wait(for: "BLOCK_JOB_READY")
        try job.cancel(force: false)
        recorder.wait(for: "JSC null")
        XCTAssertTrue(recorder.names().contains("BLOCK_JOB_COMPLETED"))
        XCTAssertFalse(recorder.names().contains("BLOCK_JOB_CANCELLED"))
        XCTAssertTrue(filter.device === source)
        XCTAssertTrue(target.contents == source.contents, "the target differs")
    }

    func testCancelBeforeReadyEmitsCancelled() throws {
        let (filter, source) = makeFilter(size: 4 << 20, seed: 6)
        let target = MemoryBlockDevice(size: 4 << 20)
        // The first copy's write is held in the target: the job cannot be ready when cancelled.
        let entered = DispatchSemaphore(value: 0), proceed = DispatchSemaphore(value: 0)
        target.gate.withLock { $0 = (entered, proceed) }
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        let job = try filter.startMirror(to: target, options: MirrorOptions(jobID: "disk.raw"))
        XCTAssertEqual(entered.wait(timeout: .now() + 10), .success, "no copy reached the target")
        try job.cancel(force: false)
        proceed.signal()
        recorder.wait(for: "JSC null")
        XCTAssertFalse(recorder.names().contains("BLOCK_JOB_READY"))
        XCTAssertEqual(recorder.names().suffix(4), ["JSC aborting", "BLOCK_JOB_CANCELLED", "JSC concluded", "JSC null"])
        XCTAssertTrue(filter.device === source)
        XCTAssertEqual(filter.jobJSON(), "null\n")
    }

    func testVerbsFollowQEMUsTables() throws {
        let (filter, _) = makeFilter(size: 1 << 20, seed: 7)
        let target = MemoryBlockDevice(size: 1 << 20)
        // The first copy's write is held in the target until the job has been paused: it
        // stays running (not ready) for the verbs tried meanwhile.
        let entered = DispatchSemaphore(value: 0), proceed = DispatchSemaphore(value: 0)
        target.gate.withLock { $0 = (entered, proceed) }
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        var options = MirrorOptions(jobID: "job0")
        options.speed = 64 << 10
        let job = try filter.startMirror(to: target, options: options)
        XCTAssertEqual(entered.wait(timeout: .now() + 10), .success, "no copy reached the target")
        XCTAssertThrowsError(try job.complete()) {
            XCTAssertEqual(($0 as? JobError)?.description, "Job 'job0' in state 'running' cannot accept command verb 'complete'")
        }
        XCTAssertThrowsError(try job.resume()) {
            XCTAssertEqual(($0 as? JobError)?.description, "Can't resume a job that was not paused")
        }
        try job.pause()
        XCTAssertThrowsError(try job.pause()) { XCTAssertEqual(($0 as? JobError)?.description, "Job is already paused") }
        proceed.signal()
        recorder.wait(for: "JSC paused")
        XCTAssertThrowsError(try job.cancel(force: false)) {
            XCTAssertEqual(($0 as? JobError)?.description, "The block job for device 'job0' is currently paused")
        }
        try job.resume()
        try job.change(copyMode: .writeBlocking)
        XCTAssertThrowsError(try job.change(copyMode: .background)) {
            XCTAssertEqual(($0 as? JobError)?.description, "Change to copy mode 'background' is not implemented")
        }
        XCTAssertThrowsError(try job.setSpeed(-1))
        try job.setSpeed(0)
        recorder.wait(for: "BLOCK_JOB_READY")
        try job.complete()
        recorder.wait(for: "JSC null")
        XCTAssertThrowsError(try job.pause()) {
            XCTAssertEqual(($0 as? JobError)?.description, "Job 'job0' in state 'null' cannot accept command verb 'pause'")
        }
    }

    func testTargetErrorWithStopPausesWithNospaceAndResumeFinishes() throws {
        let (filter, source) = makeFilter(size: 2 << 20, seed: 8)
        let target = MemoryBlockDevice(size: 2 << 20)
        target.failWrites.withLock { $0 = (.noSpace, 3) }
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        var options = MirrorOptions(jobID: "disk.raw")
        options.onTargetError = .stop
        let job = try filter.startMirror(to: target, options: options)
        recorder.wait(for: "BLOCK_JOB_ERROR")
        recorder.wait(for: "JSC paused")
        XCTAssertEqual(job.info().ioStatus, .nospace)
        XCTAssertFalse(job.activelySynced)
        // The image's user is not disturbed.
        XCTAssertEqual(try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try filter.write($0, at: 0, cache: .cached) }, 4096)
        // Each stop is resumed until the failing writes are used up and the job is ready.
        for _ in 0..<5 where !recorder.names().contains("BLOCK_JOB_READY") {
            XCTAssertTrue(job.wait(timeout: 30) { $0.ioStatus != .ok || $0.ready })
            if job.info().ioStatus != .ok { try job.resume() }
        }
        XCTAssertNil(target.failWrites.withLock { $0 }, "the job never retried the failed writes")
        recorder.wait(for: "BLOCK_JOB_READY")
        try job.complete()
        recorder.wait(for: "JSC null")
        XCTAssertTrue(target.contents == source.contents, "the target differs")
    }

    /// A write-blocking job stopped by a target error mirrors no user write until resumed:
    /// they are tracked dirty (a dead target must not hold each of them up again).
    func testWhileStoppedByATargetErrorWritesAreTrackedNotMirrored() throws {
        let (filter, source) = makeFilter(size: 2 << 20, seed: 11)
        let target = MemoryBlockDevice(size: 2 << 20)
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        var options = MirrorOptions(jobID: "disk.raw")
        options.copyMode = .writeBlocking
        options.onTargetError = .stop
        let job = try filter.startMirror(to: target, options: options)
        recorder.wait(for: "BLOCK_JOB_READY")
        XCTAssertTrue(job.wait(timeout: 30) { $0.activelySynced }, "never actively synced")
        target.failWrites.withLock { $0 = (.ioError, 1) }
        XCTAssertEqual(try [UInt8](repeating: 1, count: 4096).withUnsafeBytes { try filter.write($0, at: 0, cache: .cached) }, 4096)
        XCTAssertEqual(job.info().ioStatus, .failed)
        recorder.wait(for: "JSC standby")
        let fresh = [UInt8](repeating: 0x55, count: 4096)
        XCTAssertEqual(try fresh.withUnsafeBytes { try filter.write($0, at: 1 << 20, cache: .cached) }, 4096)
        XCTAssertFalse(target.contents[(1 << 20)..<((1 << 20) + 4096)].allSatisfy { $0 == 0x55 }, "not mirrored while stopped")
        XCTAssertGreaterThan(job.info().dirtyBytes, 0)
        XCTAssertFalse(job.activelySynced)
        try job.resume()
        XCTAssertTrue(job.wait(timeout: 30) { $0.activelySynced })
        XCTAssertTrue(target.contents == source.contents, "the target differs")
    }

    func testTargetErrorWithReportFailsTheJobButNotTheUser() throws {
        let (filter, _) = makeFilter(size: 2 << 20, seed: 9)
        let target = MemoryBlockDevice(size: 2 << 20)
        target.failWrites.withLock { $0 = (.ioError, 1) }
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        _ = try filter.startMirror(to: target, options: MirrorOptions(jobID: "disk.raw"))
        recorder.wait(for: "JSC null")
        let completed = recorder.all.first { $0.name == "BLOCK_JOB_COMPLETED" }
        XCTAssertEqual(completed?.data["error"], .string("Input/output error"))
        XCTAssertEqual(recorder.all.filter { $0.name == "BLOCK_JOB_ERROR" }.count, 1)
        XCTAssertEqual(try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try filter.write($0, at: 0, cache: .cached) }, 4096)
    }

    func testSizeMismatchFailsAtRunTime() throws {
        let (filter, _) = makeFilter(size: 1 << 20, seed: 10)
        let recorder = EventRecorder()
        filter.addEventListener { recorder.record($0) }
        _ = try filter.startMirror(to: MemoryBlockDevice(size: 2 << 20), options: MirrorOptions(jobID: "disk.raw"))
        recorder.wait(for: "JSC null")
        let completed = recorder.all.first { $0.name == "BLOCK_JOB_COMPLETED" }
        XCTAssertEqual(completed?.data["error"], .string("Source and target image have different sizes"))
    }
}

/// Threads writing random ranges (unaligned, and with `allocationChanges` also punching
/// holes and zeroing) through a filter until stopped; each thread has its own seed.
final class RandomWriters: Sendable {
    private let running = Atomic<Bool>(true)
    private let group = DispatchGroup()
    /// Writes done so far (woken at each).
    private let written = ConditionLock<Int>(0)

    var writes: Int { written.withLock { $0 } }

    /// Waits until `count` writes were done; false after 30 s.
    func wait(forWrites count: Int) -> Bool {
        let deadline = Date().addingTimeInterval(30)
        return written.withLock(waiting: { n in
            if n >= count { return .done(true) }
            let left = deadline.timeIntervalSinceNow
            return left > 0 ? .wait(timeout: left) : .done(false)
        })
    }

    init(filter: MirrorFilter, size: UInt64, count: Int, seed: UInt64, maxLength: Int, allocationChanges: Bool = false) {
        for w in 0..<count {
            group.enter()
            Thread { [self] in
                var rng = SeededGenerator(seed: seed + UInt64(w))
                while running.load(ordering: .relaxed) {
                    let length = Int.random(in: 1...maxLength, using: &rng)
                    let offset = UInt64.random(in: 0..<(size - UInt64(length)), using: &rng)
                    let data = [UInt8](repeating: UInt8.random(in: 0...255, using: &rng), count: length)
                    switch allocationChanges ? Int.random(in: 0..<10, using: &rng) : 9 {
                    case 0: try? filter.changeAllocation(.punchHole, at: offset, length: UInt64(length), keepSize: true)
                    case 1: try? filter.changeAllocation(.zeroRange, at: offset, length: UInt64(length), keepSize: true)
                    default: _ = try? data.withUnsafeBytes { try filter.write($0, at: offset, cache: .cached) }
                    }
                    written.withLock { $0 += 1 }
                    written.broadcast()
                }
                group.leave()
            }.start()
        }
    }

    func stop() {
        running.store(false, ordering: .relaxed)
        group.wait()
    }
}

/// SplitMix64: reproducible runs from a seed.
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
