import CLinux
import Glibc
import SystemPackage

/// A background job's writes through to the target, after ready (SPEC 4: the copier
/// catches up): a user's O_DIRECT data write into chunks that are clean and that nothing
/// holds goes to the target from a copy of its own data, submitted to the kernel (Linux
/// AIO) once the source write returned and the reply went out: the user waits for neither
/// the target write nor its submission, and the source write has the disk alone. Its chunks
/// stay claimed until both halves are done — the source write returned and the target
/// write's completion reaped (by a writer, or `MirrorJob.reapWriteThroughs`) — so no copy
/// reads the chunk before the source holds the new data, and no copy or other write
/// reaches the target's chunk meanwhile; a failure re-dirties the part and goes to the
/// error policy, as a mirrored write's does. Without it, each 4 KiB write dirtied a 64 KiB
/// chunk that the copier then read and wrote whole: 32 times the I/O.
final class WriteThroughQueue: Sendable {
    /// Requests in flight at most (the AIO context's depth).
    static let depth = 64
    /// The largest write taken (larger ones are left to the copier).
    static let maxBytes = 1 << 20

    private let context: AIOContext
    private struct Pending {
        let op: MirrorOp
        /// The copy of the data (posix_memalign'd), freed (then 0) when reaped.
        var buffer: UInt
        let count: Int
        /// The source write returned.
        var sourceDone = false
        /// The target write's outcome, once reaped.
        var targetDone: Result<Void, Errno>?
    }
    private struct Requests {
        var next: UInt64 = 1
        var requests: [UInt64: Pending] = [:]
        /// Requests whose source write returned before their target write was reaped: the
        /// reaper comes by for these (and only while there are some).
        var stragglers = 0
    }
    private let pending = ConditionLock(Requests())

    /// Nil when the kernel gives no AIO context.
    init?() {
        guard let context = AIOContext(depth: Self.depth) else { return nil }
        self.context = context
    }

    // No deinit frees buffers: the queue goes with its job, after the reaper ended, which
    // is once every request was settled (its buffer freed). One still in flight would be
    // left allocated: the kernel may read it until the context is destroyed.

    /// Copies `data` and submits its write at `offset` of `fd` for `op`: the tag that
    /// `sourceDone` takes. Nil, with nothing in flight, when the kernel refused it.
    func submit(_ data: UnsafeRawBufferPointer, to fd: CInt, at offset: UInt64, for op: MirrorOp) -> UInt64? {
        var pointer: UnsafeMutableRawPointer?
        guard posix_memalign(&pointer, AlignedBufferPool.alignment, data.count) == 0, let pointer else { return nil }
        pointer.copyMemory(from: data.baseAddress!, byteCount: data.count)
        let tag = pending.withLock { p in
            defer { p.next += 1 }
            p.requests[p.next] = Pending(op: op, buffer: UInt(bitPattern: pointer), count: data.count)
            return p.next
        }
        guard context.submitWrite(fd, UnsafeRawBufferPointer(start: pointer, count: data.count), at: offset, tag: tag) else {
            _ = pending.withLock { $0.requests.removeValue(forKey: tag) }
            free(pointer)
            return nil
        }
        return tag
    }

    /// The source write of `tag` returned. The writer takes whatever completions the kernel
    /// has (without waiting): the ops and target failures to settle now — its own when its
    /// target write is done too, and any other whose source write had returned. Its own is
    /// left to a later writer or the reaper otherwise, so a steady stream of writes settles
    /// on the writers' own threads and wakes no other.
    func sourceDone(_ tag: UInt64) -> [(MirrorOp, Errno?)] {
        sourceDone(tag, harvested: harvest(timeout: 0))
    }

    /// Up to 16 completions from the kernel, waiting up to `timeout` ms (forever when
    /// negative) for the first: each one's tag and bytes written or errno.
    func harvest(timeout: Int32) -> [(tag: UInt64, written: Result<Int, Errno>)] {
        context.wait(max: 16, timeout: timeout) ?? []
    }

    /// `sourceDone` with the completions the writer took from the kernel.
    func sourceDone(_ tag: UInt64, harvested completions: [(tag: UInt64, written: Result<Int, Errno>)]) -> [(MirrorOp, Errno?)] {
        var wakeReaper = false
        let settled = pending.withLock { p -> [(MirrorOp, Errno?)] in
            var settled = Self.record(completions, in: &p)
            guard let request = p.requests[tag] else { return settled }
            if let target = request.targetDone {
                p.requests[tag] = nil
                settled.append((request.op, target.failure))
            } else {
                p.requests[tag]?.sourceDone = true
                p.stragglers += 1
                wakeReaper = p.stragglers == 1
            }
            return settled
        }
        if wakeReaper { pending.signal() }
        return settled
    }

    /// For the reaper: while some source write returned before its target write was
    /// reaped, takes what the kernel completed a millisecond later (writers take most
    /// completions as their own source writes return: the reaper is there for the last
    /// writes before a pause, and wakes at most a thousand times a second); else waits up
    /// to `timeout` ms for there to be one. The op and failure of each completion whose
    /// source write has returned too, for the caller to settle (none yet, maybe); `nil`
    /// when no source write waits for its target write.
    func reap(timeout: Int32) -> [(MirrorOp, Errno?)]? {
        var waited = false
        let waiting = pending.withLock(waiting: { p -> ConditionLock<Requests>.Decision<Bool> in
            if p.stragglers > 0 { return .done(true) }
            if waited { return .done(false) }
            waited = true
            return .wait(timeout: Double(timeout) / 1000)
        })
        guard waiting else { return nil }
        usleep(1000)
        let completions = harvest(timeout: 0)
        guard !completions.isEmpty else { return [] }
        return pending.withLock { Self.record(completions, in: &$0) }
    }

    /// Frees each completion's buffer and records its outcome (a short write counts as out
    /// of space): the op and failure of each whose source write has returned, to settle.
    private static func record(_ completions: [(tag: UInt64, written: Result<Int, Errno>)],
                               in p: inout Requests) -> [(MirrorOp, Errno?)] {
        completions.compactMap { completion in
            guard let request = p.requests[completion.tag] else { return nil }
            free(UnsafeMutableRawPointer(bitPattern: request.buffer))
            let failure: Errno? = switch completion.written {
            case .failure(let errno): errno
            case .success(let n): n < request.count ? .noSpace : nil
            }
            guard request.sourceDone else {
                p.requests[completion.tag]?.targetDone = failure.map { .failure($0) } ?? .success(())
                p.requests[completion.tag]?.buffer = 0
                return nil
            }
            p.requests[completion.tag] = nil
            p.stragglers -= 1
            return (request.op, failure)
        }
    }
}
