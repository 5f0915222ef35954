import Foundation
import MirrorCore
import Synchronization
import SystemPackage

/// An in-memory block device for engine tests: byte-exact contents, a map of allocated
/// 4 KiB blocks for SEEK_DATA/SEEK_HOLE, and injectable failures.
final class MemoryBlockDevice: BlockDevice, @unchecked Sendable {
    let size: UInt64
    private let lock = NSLock()
    private var bytes: [UInt8]
    private var allocated: [Bool]
    private static let block: UInt64 = 4096
    /// Fail writes (and punches) with this error for the next `failWritesCount` calls.
    let failWrites = Mutex<(error: Errno, count: Int)?>(nil)
    /// Each write gives up the CPU before its bytes land, so other threads (copies, other
    /// writes) run in between: wider race windows, with no time in the test.
    let yieldsMidWrite: Bool
    /// When set, the next write signals `entered` and then waits for `proceed` before its
    /// bytes land: a write held in flight at a moment the test chooses.
    let gate = Mutex<(entered: DispatchSemaphore, proceed: DispatchSemaphore)?>(nil)

    init(size: UInt64, yieldsMidWrite: Bool = false) {
        self.size = size
        self.yieldsMidWrite = yieldsMidWrite
        bytes = [UInt8](repeating: 0, count: Int(size))
        allocated = [Bool](repeating: false, count: Int((size + Self.block - 1) / Self.block))
    }

    var contents: [UInt8] { lock.withLock { bytes } }

    private func injectedFailure() -> Errno? {
        failWrites.withLock { f in
            guard let current = f, current.count > 0 else { return nil }
            f = current.count == 1 ? nil : (current.error, current.count - 1)
            return current.error
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) -> Int {
        guard offset < size else { return 0 }
        let count = Int(min(UInt64(buffer.count), size - offset))
        lock.withLock {
            bytes.withUnsafeBytes { src in
                buffer.baseAddress!.copyMemory(from: src.baseAddress! + Int(offset), byteCount: count)
            }
        }
        return count
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) {
        if yieldsMidWrite { sched_yield() }
        if let held = gate.withLock({ g in defer { g = nil }; return g }) {
            held.entered.signal()
            held.proceed.wait()
        }
        if let error = injectedFailure() { throw error }
        lock.withLock {
            bytes.withUnsafeMutableBytes { dst in
                (dst.baseAddress! + Int(offset)).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
            }
            markAllocated(offset, UInt64(buffer.count), true)
        }
    }

    private func markAllocated(_ offset: UInt64, _ length: UInt64, _ value: Bool) {
        guard length > 0 else { return }
        // Punching deallocates whole blocks only, as a file system does.
        let first = value ? offset / Self.block : (offset + Self.block - 1) / Self.block
        let end = value ? (offset + length + Self.block - 1) / Self.block : (offset + length) / Self.block
        guard first < end else { return }
        for b in Int(first)..<min(Int(end), allocated.count) { allocated[b] = value }
    }

    func flush(dataOnly: Bool) throws(Errno) {}

    func punchHole(at offset: UInt64, length: UInt64) throws(Errno) {
        if let error = injectedFailure() { throw error }
        lock.withLock {
            for i in Int(offset)..<Int(offset + length) { bytes[i] = 0 }
            markAllocated(offset, length, false)
        }
    }

    func zeroRange(at offset: UInt64, length: UInt64) throws(Errno) {
        if let error = injectedFailure() { throw error }
        lock.withLock {
            for i in Int(offset)..<Int(offset + length) { bytes[i] = 0 }
            markAllocated(offset, length, true)
        }
    }

    func preallocate(at offset: UInt64, length: UInt64) throws(Errno) {
        lock.withLock { markAllocated(offset, length, true) }
    }

    func seek(_ target: SeekTarget, from offset: UInt64) throws(Errno) -> UInt64 {
        lock.lock()
        defer { lock.unlock() }
        var b = Int(offset / Self.block)
        while b < allocated.count {
            if allocated[b] == (target == .data) { return max(UInt64(b) * Self.block, offset) }
            b += 1
        }
        if target == .hole { return size }
        throw Errno.noSuchAddressOrDevice
    }

    /// Each in-memory device is its own storage.
    var identity: DeviceIdentity { DeviceIdentity(device: 0, inode: UInt64(UInt(bitPattern: ObjectIdentifier(self).hashValue))) }

    func allocatedBytes() throws(Errno) -> UInt64 {
        lock.withLock { UInt64(allocated.filter { $0 }.count) * Self.block }
    }
}
