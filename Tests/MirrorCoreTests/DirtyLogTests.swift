import Foundation
@testable import MirrorCore
import SystemPackage
import XCTest

final class DirtyLogTests: XCTestCase {
    private var directory: String!
    private var source: FileBlockDevice!
    private var target: FileBlockDevice!
    private var logPath: String { directory + "/target.raw.dirtylog" }

    override func setUpWithError() throws {
        directory = NSTemporaryDirectory() + "/dirtylog-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for name in ["source.raw", "target.raw", "other.raw"] {
            _ = FileManager.default.createFile(atPath: directory + "/" + name, contents: nil)
            XCTAssertEqual(truncate(directory + "/" + name, off_t(8 * DirtyLog.regionSize)), 0)
        }
        let pool = AlignedBufferPool(bufferSize: 1 << 20)
        source = try FileBlockDevice(path: directory + "/source.raw", readOnly: false, bufferPool: pool)
        target = try FileBlockDevice(path: directory + "/target.raw", readOnly: false, bufferPool: pool)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: directory)
    }

    private var identity: DirtyLog.Identity { DirtyLog.Identity(source: source, target: target) }

    /// The header's record walks the job's persistent life cycle and survives reopening.
    func testTheRecordGoesFromMirroringToStoppedOrCompletedAndSurvivesAReopen() throws {
        let log = try DirtyLog.create(path: logPath, identity: identity, allDirty: false, targetName: "/new/target.raw")
        XCTAssertEqual(log.record, .mirroring)
        log.mark(offset: 0, length: 1)
        log.finished(offset: 0, length: 1)
        let stopped = DirtyLog.Record.stopped(source: ChangeStamp(nanoseconds: 11), target: ChangeStamp(nanoseconds: 22))
        try log.setRecord(stopped)
        let reopened = try DirtyLog.resume(path: logPath, identity: identity)
        XCTAssertEqual(reopened.record, stopped)
        XCTAssertEqual(reopened.targetName, "/new/target.raw")
        XCTAssertEqual(reopened.loggedRegions, 1, "the bits survive the stop")
        try reopened.begin()
        XCTAssertEqual(try DirtyLog.resume(path: logPath, identity: identity).record, .mirroring)
        try reopened.setRecord(.completed(time: 1_700_000_000))
        XCTAssertEqual(try DirtyLog.resume(path: logPath, identity: identity).record, .completed(time: 1_700_000_000))
        // A damaged record is rejected (the header checksum covers it).
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: logPath))
        try handle.seek(toOffset: 128)
        handle.write(Data([7, 0, 0, 0]))
        try handle.close()
        XCTAssertThrowsError(try DirtyLog.resume(path: logPath, identity: identity))
    }

    func testMarkedRegionsSurviveAReopenAndClearedOnesDoNot() throws {
        let log = try DirtyLog.create(path: logPath, identity: identity, allDirty: false)
        let region = DirtyLog.regionSize
        log.mark(offset: 100, length: 10)                   // region 0
        log.finished(offset: 100, length: 10)
        log.mark(offset: 3 * region - 1, length: 2)         // regions 2 and 3
        log.finished(offset: 3 * region - 1, length: 2)
        log.mark(offset: 5 * region, length: 1)             // region 5: a write still running
        XCTAssertEqual(log.loggedRegions, 4)
        // Untouched through two whole sweep intervals: candidates. Region 2 is written meanwhile.
        XCTAssertEqual(log.sweepCandidates(), [], "just written")
        XCTAssertEqual(log.sweepCandidates(), [], "written in the previous interval")
        let candidates = log.sweepCandidates()
        XCTAssertEqual(candidates, [0, 2, 3], "region 5 has a write in flight, however old")
        log.mark(offset: 2 * region, length: 1)
        log.clear(candidates)
        let reopened = try DirtyLog.resume(path: logPath, identity: identity)
        XCTAssertEqual(reopened.loggedRanges(imageSize: 8 * region).map(\.offset), [2 * region, 5 * region])
    }

    func testBadLogsAreEachRejected() throws {
        func fresh() throws { _ = try DirtyLog.create(path: logPath, identity: identity, allDirty: true) }
        func expect(_ rejection: DirtyLog.Rejection, file: StaticString = #filePath, line: UInt = #line) {
            XCTAssertThrowsError(try DirtyLog.resume(path: logPath, identity: identity), file: file, line: line) {
                XCTAssertEqual($0 as? DirtyLog.Rejection, rejection, file: file, line: line)
            }
        }
        func patch(_ offset: Int, _ bytes: [UInt8]) throws {
            let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: logPath))
            try handle.seek(toOffset: UInt64(offset))
            handle.write(Data(bytes))
            try handle.close()
        }
        expect(.missing)

        try fresh()
        try patch(50, [0xff])                      // a corrupted header byte
        expect(.badChecksum)

        try fresh()
        XCTAssertEqual(truncate(logPath, 4096 + 0), 0)   // the bitmap is cut off
        expect(.truncated)

        try fresh()
        try patch(24, [9, 0, 0, 0])                // another format version
        expect(.wrongVersion(9))

        try fresh()
        try patch(0, Array("NOT-A-LOG".utf8))
        expect(.badMagic)

        // A log written for another target (a swapped file of the same name and size).
        let other = try FileBlockDevice(path: directory + "/other.raw", readOnly: false, bufferPool: AlignedBufferPool(bufferSize: 4096))
        _ = try DirtyLog.create(path: logPath, identity: DirtyLog.Identity(source: source, target: other), allDirty: true)
        expect(.identityMismatch)
    }
}
