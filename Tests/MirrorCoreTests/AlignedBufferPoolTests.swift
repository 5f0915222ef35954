import Foundation
import MirrorCore
import Synchronization
import XCTest

private func address(_ buffer: UnsafeMutableRawBufferPointer) -> UInt { UInt(bitPattern: buffer.baseAddress) }

final class AlignedBufferPoolTests: XCTestCase {
    func testNestedRequestsOnOneThreadGetDistinctAlignedBuffers() {
        let pool = AlignedBufferPool(bufferSize: 1 << 16)
        pool.withBuffer(count: 4096) { outer in
            pool.withBuffer(count: 1 << 16) { inner in
                XCTAssertNotEqual(address(outer), address(inner))
                XCTAssertEqual(address(outer) % UInt(AlignedBufferPool.alignment), 0)
                XCTAssertEqual(address(inner) % UInt(AlignedBufferPool.alignment), 0)
                XCTAssertEqual(inner.count, 1 << 16)
                // Both are writable over their whole length.
                outer.initializeMemory(as: UInt8.self, repeating: 1)
                inner.initializeMemory(as: UInt8.self, repeating: 2)
                XCTAssertEqual(outer.load(fromByteOffset: 4095, as: UInt8.self), 1)
            }
        }
    }

    func testEveryThreadKeepsItsOwnBufferAcrossRequests() throws {
        let pool = AlignedBufferPool(bufferSize: 1 << 16)
        let threads = 8
        let results = Mutex<[(first: UInt, second: UInt)]>([])
        // Every thread holds its buffer while all others hold theirs, so no two can share one.
        let holding = DispatchGroup(), release = DispatchSemaphore(value: 0), done = DispatchGroup()
        for _ in 0..<threads {
            holding.enter()
            done.enter()
            Thread {
                let first = pool.withBuffer(count: 4096) { buffer -> UInt in
                    holding.leave()
                    release.wait()
                    return address(buffer)
                }
                let second = pool.withBuffer(count: 4096) { address($0) }
                results.withLock { $0.append((first, second)) }
                done.leave()
            }.start()
        }
        XCTAssertEqual(holding.wait(timeout: .now() + 10), .success)
        for _ in 0..<threads { release.signal() }
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        let firstAndSecond = results.withLock { $0 }
        XCTAssertEqual(Set(firstAndSecond.map(\.first)).count, threads, "buffers held at once are distinct")
        for (first, second) in firstAndSecond {
            XCTAssertEqual(first, second, "a thread's next request reuses its own buffer")
        }
    }
}
