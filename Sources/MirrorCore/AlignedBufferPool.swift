import Glibc
import Synchronization

/// Page-aligned buffers for O_DIRECT I/O, reused across requests so the hot path
/// neither maps fresh memory nor faults it in. Buffers beyond `retained` are freed.
public final class AlignedBufferPool: Sendable {
    public static let alignment = 4096
    public let bufferSize: Int
    private let retained: Int
    /// Free buffers by address (raw pointers are not Sendable; their owner is this pool).
    private let free = Mutex<[UInt]>([])

    public init(bufferSize: Int, retained: Int = 32) {
        self.bufferSize = bufferSize
        self.retained = retained
    }

    deinit {
        free.withLock { $0.forEach { Glibc.free(UnsafeMutableRawPointer(bitPattern: $0)) } }
    }

    /// Runs `body` with an aligned buffer of at least `count` bytes (`count` ≤ `bufferSize`).
    public func withBuffer<R, E: Error>(
        count: Int, _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R
    ) throws(E) -> R {
        precondition(count <= bufferSize, "request larger than the pool's buffers")
        let pointer = free.withLock { $0.popLast() }.flatMap { UnsafeMutableRawPointer(bitPattern: $0) }
            ?? Self.allocate(bufferSize)
        defer {
            let kept = free.withLock { list -> Bool in
                guard list.count < retained else { return false }
                list.append(UInt(bitPattern: pointer))
                return true
            }
            if !kept { Glibc.free(pointer) }
        }
        return try body(UnsafeMutableRawBufferPointer(start: pointer, count: count))
    }

    private static func allocate(_ size: Int) -> UnsafeMutableRawPointer {
        var pointer: UnsafeMutableRawPointer?
        guard posix_memalign(&pointer, alignment, size) == 0, let pointer else {
            fatalError("out of memory allocating a \(size)-byte I/O buffer")
        }
        return pointer
    }
}
