import Foundation
@testable import MirrorCore
import SystemPackage
import XCTest

final class FileBlockDeviceTests: XCTestCase {
    private var directory: String!

    override func setUpWithError() throws {
        directory = NSTemporaryDirectory() + "/mirrorcore-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func makeFile(size: Int) -> String {
        let path = directory + "/image.raw"
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        XCTAssertEqual(truncate(path, off_t(size)), 0)
        return path
    }

    func testWritesAndReadsAtUnalignedOffsetsThroughBothCachePolicies() throws {
        let pool = AlignedBufferPool(bufferSize: 1 << 20)
        let device = try FileBlockDevice(path: makeFile(size: 1 << 20), readOnly: false, bufferPool: pool)
        for (offset, count, cache) in [(0, 4096, CachePolicy.direct), (4097, 3000, .direct), (8192, 65536, .cached), (12345, 1, .cached)] {
            let pattern = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ offset) }
            try pattern.withUnsafeBytes { try device.write($0, at: UInt64(offset), cache: cache) }
            var back = [UInt8](repeating: 0, count: count)
            let n = try back.withUnsafeMutableBytes { try device.read(into: $0, at: UInt64(offset), cache: cache) }
            XCTAssertEqual(n, count)
            XCTAssertEqual(back, pattern, "offset \(offset) \(cache)")
        }
    }

    func testAWriteAlongsideRunsInTheKernelWhileTheCallerWorksAndOnlyWhenDirect() throws {
        let pool = AlignedBufferPool(bufferSize: 1 << 20)
        let device = try FileBlockDevice(path: makeFile(size: 1 << 20), readOnly: false, bufferPool: pool)
        // An unaligned buffer (bounced) and an aligned one, both O_DIRECT and aligned in the file.
        let unaligned = [UInt8](repeating: 0x5a, count: 8192 + 1)
        let aligned = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { aligned.deallocate() }
        aligned.initializeMemory(as: UInt8.self, repeating: 0xa5)
        try unaligned.withUnsafeBytes { bytes in
            for (buffer, offset) in [(UnsafeRawBufferPointer(rebasing: bytes[1...]), UInt64(4096)),
                                     (UnsafeRawBufferPointer(aligned), UInt64(65536))] {
                var ran = false
                let result = device.write(buffer, at: offset, cache: .direct, alongside: { ran = true; return 7 })
                XCTAssertEqual(result?.0, 7)
                XCTAssertNotNil(result)
                if let result { XCTAssertNil(result.1) }
                XCTAssertTrue(ran)
                var back = [UInt8](repeating: 0, count: buffer.count)
                _ = try back.withUnsafeMutableBytes { try device.read(into: $0, at: offset, cache: .cached) }
                XCTAssertEqual(back, Array(buffer), "offset \(offset)")
            }
        }
        // Cached, or unaligned in the file: not taken, and the caller's work not run.
        var ran = false
        XCTAssertNil(device.write(UnsafeRawBufferPointer(aligned), at: 0, cache: .cached, alongside: { ran = true }))
        XCTAssertNil(device.write(UnsafeRawBufferPointer(rebasing: aligned[0..<100]), at: 100, cache: .direct, alongside: { ran = true }))
        XCTAssertFalse(ran)
    }

    /// Should leave a write-through to whichever of its halves ends last: the target's
    /// completion reaped before the source write returned is not settled yet, nor the
    /// reverse; each op settles exactly once. The writer takes what the kernel completed
    /// without waiting; the reaper takes completions only while a source write returned
    /// before its target write was reaped.
    func testAWriteThroughSettlesWhenBothHalvesAreDone() throws {
        let pool = AlignedBufferPool(bufferSize: 1 << 20)
        let device = try FileBlockDevice(path: makeFile(size: 1 << 20), readOnly: false, bufferPool: pool)
        let queue = try XCTUnwrap(WriteThroughQueue())
        let data = [UInt8](repeating: 0x77, count: 4096)
        let fd = try XCTUnwrap(device.asynchronousWriteDescriptor(offset: 8192, count: 4096, cache: .direct))
        // What the reaper settles, until `count` ops or no source write waits any more.
        func reap(_ count: Int) -> [(MirrorOp, Errno?)] {
            var settled: [(MirrorOp, Errno?)] = []
            let deadline = Date().addingTimeInterval(10)
            while settled.count < count, Date() < deadline, let done = queue.reap(timeout: 100) { settled += done }
            return settled
        }
        let op = MirrorOp(offset: 8192, length: 4096, chunks: 0..<1, mirrored: false)
        // No source write has returned: the reaper does not take the completion.
        let first = try XCTUnwrap(data.withUnsafeBytes { queue.submit($0, to: fd, at: 8192, for: op) })
        XCTAssertNil(queue.reap(timeout: 100), "settled before the source write returned")
        // The writer takes its own completion from the kernel and settles it.
        let byWriter = queue.sourceDone(first)
        XCTAssertEqual(byWriter.map(\.0), [op])
        XCTAssertNil(byWriter.first?.1 ?? nil)
        // Source first (the writer found nothing completed): the reaper waits for it.
        let second = try XCTUnwrap(data.withUnsafeBytes { queue.submit($0, to: fd, at: 8192, for: op) })
        XCTAssertTrue(queue.sourceDone(second, harvested: []).isEmpty)
        let byReaper = reap(1)
        XCTAssertEqual(byReaper.map(\.0), [op])
        XCTAssertNil(queue.reap(timeout: 10), "settled twice")
        var back = [UInt8](repeating: 0, count: 4096)
        _ = try back.withUnsafeMutableBytes { try device.read(into: $0, at: 8192, cache: .cached) }
        XCTAssertEqual(back, data)
        // A writer that takes another's completion settles that one too, once.
        let other = MirrorOp(offset: 0, length: 4096, chunks: 0..<1, mirrored: false)
        let third = try XCTUnwrap(data.withUnsafeBytes { queue.submit($0, to: fd, at: 8192, for: op) })
        let fourth = try XCTUnwrap(data.withUnsafeBytes { queue.submit($0, to: fd, at: 0, for: other) })
        var completed: [(tag: UInt64, written: Result<Int, Errno>)] = []
        let deadline = Date().addingTimeInterval(10)
        while completed.count < 2 && Date() < deadline { completed += queue.harvest(timeout: 1000) }
        XCTAssertEqual(completed.map(\.tag).sorted(), [third, fourth])
        XCTAssertTrue(queue.sourceDone(third, harvested: []).isEmpty)
        let both = queue.sourceDone(fourth, harvested: completed)
        XCTAssertEqual(Set(both.map(\.0.offset)), [op.offset, other.offset])
        XCTAssertEqual(both.count, 2)
        XCTAssertNil(queue.reap(timeout: 10), "settled twice")
    }

    func testReadsStopAtTheEnd() throws {
        let device = try FileBlockDevice(path: makeFile(size: 10_000), readOnly: true, bufferPool: AlignedBufferPool(bufferSize: 1 << 16))
        var buffer = [UInt8](repeating: 1, count: 8192)
        XCTAssertEqual(try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: 8192, cache: .direct) }, 10_000 - 8192)
        XCTAssertEqual(try buffer.withUnsafeMutableBytes { try device.read(into: $0, at: 10_000, cache: .cached) }, 0)
    }

    func testRefusesWhatIsNotARegularFile() {
        XCTAssertThrowsError(try FileBlockDevice(path: directory, readOnly: true, bufferPool: AlignedBufferPool(bufferSize: 4096)))
        XCTAssertThrowsError(try FileBlockDevice(path: directory + "/missing", readOnly: true, bufferPool: AlignedBufferPool(bufferSize: 4096))) {
            XCTAssertEqual($0 as? Errno, .noSuchFileOrDirectory)
        }
    }
}

final class MirrorFilterTests: XCTestCase {
    func testWritesAreCutAtTheEndAndNothingPastItFits() throws {
        let path = NSTemporaryDirectory() + "/filter-\(UUID().uuidString).raw"
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        defer { try? FileManager.default.removeItem(atPath: path) }
        XCTAssertEqual(truncate(path, 4096), 0)
        let filter = MirrorFilter(source: try FileBlockDevice(path: path, readOnly: false, bufferPool: AlignedBufferPool(bufferSize: 8192)), readOnly: false)
        let bytes = [UInt8](repeating: 7, count: 200)
        XCTAssertEqual(try bytes.withUnsafeBytes { try filter.write($0, at: 4000, cache: .cached) }, 96)
        XCTAssertThrowsError(try bytes.withUnsafeBytes { try filter.write($0, at: 4096, cache: .cached) }) {
            XCTAssertEqual($0 as? Errno, .noSpace)
        }
        XCTAssertThrowsError(try filter.changeAllocation(.zeroRange, at: 4000, length: 200, keepSize: false)) {
            XCTAssertEqual($0 as? Errno, .notPermitted)
        }
        XCTAssertNoThrow(try filter.changeAllocation(.punchHole, at: 0, length: 1 << 20, keepSize: true))
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int, 4096)
    }

    func testReadOnlyFilterRefusesWrites() throws {
        let path = NSTemporaryDirectory() + "/filter-ro-\(UUID().uuidString).raw"
        _ = FileManager.default.createFile(atPath: path, contents: Data(count: 4096))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let filter = MirrorFilter(source: try FileBlockDevice(path: path, readOnly: true, bufferPool: AlignedBufferPool(bufferSize: 4096)), readOnly: true)
        XCTAssertThrowsError(try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try filter.write($0, at: 0, cache: .cached) }) {
            XCTAssertEqual($0 as? Errno, .readOnlyFileSystem)
        }
    }
}

final class EventLogTests: XCTestCase {
    func testKeepsTheMostRecentLinesOldestFirst() {
        let log = EventLog(capacity: 3)
        XCTAssertEqual(log.text(), "")
        for i in 1...5 { log.append("{\"n\":\(i)}") }
        XCTAssertEqual(log.text(), "{\"n\":3}\n{\"n\":4}\n{\"n\":5}\n")
    }
}
