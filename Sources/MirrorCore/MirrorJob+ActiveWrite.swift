import SystemPackage

/// What a request does to the image, as the filter hands it to the job.
public enum ImageWrite {
    case data(UnsafeRawBufferPointer)
    case punchHole(length: UInt64)
    case zeroRange(length: UInt64)

    var length: UInt64 {
        switch self {
        case .data(let buffer): UInt64(buffer.count)
        case .punchHole(let length), .zeroRange(let length): length
        }
    }

    /// The same operation on [offset+skip, offset+skip+length) of `device`. On a target,
    /// a hole or zero range the file system cannot make becomes written zeroes (QEMU);
    /// on the source the user gets the source's errno.
    func apply(to device: any BlockDevice, at offset: UInt64, skip: UInt64, length: UInt64, cache: CachePolicy,
               isTarget: Bool = false) throws(Errno) {
        guard length > 0 else { return }
        switch self {
        case .data(let buffer):
            let slice = UnsafeRawBufferPointer(rebasing: buffer[Int(skip)..<Int(skip + length)])
            try device.write(slice, at: offset + skip, cache: cache)
        case .punchHole where isTarget:
            try writeZeroes(to: device, at: offset + skip, length: length, preferHole: true)
        case .zeroRange where isTarget:
            try writeZeroes(to: device, at: offset + skip, length: length, preferHole: false)
        case .punchHole:
            try device.punchHole(at: offset + skip, length: length)
        case .zeroRange:
            try device.zeroRange(at: offset + skip, length: length)
        }
    }
}

/// The result of handing a write to the job.
public enum FilterWriteResult {
    case done
    /// The job let go of the image meanwhile: send the write to the device now served.
    case detached
}

extension MirrorJob {
    /// bdrv_mirror_top_do_write: every write through the mount while the job runs.
    /// Background mode, or a job that failed or was force-cancelled: write the source, then
    /// mark the range dirty. Write-blocking: claim the whole range (waiting for overlapping
    /// operations), write the source, then write the target synchronously — except the
    /// unaligned head or tail of a chunk that is still dirty, which the copier will take.
    /// The user sees the source's result only; a target failure goes to the error policy.
    ///
    /// No bounce buffer: the data is libfuse's request buffer, which the kernel already
    /// copied from the user and which nobody changes until the reply.
    public func filterWrite(_ write: ImageWrite, at offset: UInt64, cache: CachePolicy) throws(Errno) -> FilterWriteResult {
        let length = write.length
        let granularity = options.granularity

        // active_write_prepare
        let claimed: (copied: Bool, chunks: Range<Int>)? = lock.withLock {
            while state.drained && !state.detached { lock.wait() }
            if state.detached { return nil }
            state.filterWrites += 1
            let copied = state.error == nil && !state.forceCancelled && copyMode == .writeBlocking
                && targetUsable
            let chunks = state.dirty.chunks(covering: offset, length: length)
            if copied {
                // An active write waits for its whole range: fresh data must reach the
                // target after any older copy of the same chunks.
                state.waitingActive.append(chunks)
                while (chunks.contains { state.inFlight.isDirty($0) }) { lock.wait() }
                state.waitingActive.remove(at: state.waitingActive.firstIndex(of: chunks)!)
                state.inFlight.set(chunks)
            } else {
                state.unmirroredWrites += 1
                activelySyncedValue.store(false, ordering: .releasing)
            }
            return (copied, chunks)
        }
        guard let (copied, chunks) = claimed else { return .detached }

        // The region's bit is durable before the source changes: after a crash the log
        // covers every write that may have reached the source and not the target.
        log?.mark(offset: offset, length: length)

        let sourceResult = Result { () throws(Errno) in
            try write.apply(to: source, at: offset, skip: 0, length: length, cache: cache)
        }

        // Which part goes to the target now (do_sync_target_write's head/tail rule).
        var head: UInt64 = 0, tail = length
        lock.withLock {
            if !copied {
                activelySyncedValue.store(false, ordering: .releasing)
                state.dirty.set(chunks)
                state.unmirroredWrites -= 1
                lock.broadcast()
                return
            }
            guard case .success = sourceResult else {
                // A failed source write may have changed part of the range (a short write
                // before ENOSPC): the copier brings whatever the source now holds over.
                activelySyncedValue.store(false, ordering: .releasing)
                state.dirty.set(chunks)
                return
            }
            if offset % granularity != 0 && state.dirty.isDirty(Int(offset / granularity)) {
                head = min((offset / granularity + 1) * granularity - offset, length)
            }
            let end = offset + length
            if end % granularity != 0 && end != size && state.dirty.isDirty(Int((end - 1) / granularity)) {
                tail = max((end / granularity) * granularity, offset + head) - offset
            }
            if head < tail {
                state.dirty.clear(state.dirty.chunks(inside: offset + head, length: tail - head))
                state.activeBytesInFlight += tail - head
            }
        }

        var targetFailure: Errno?
        if copied, case .success = sourceResult, head < tail {
            do {
                try write.apply(to: target, at: offset, skip: head, length: tail - head, cache: cache, isTarget: true)
            } catch {
                targetFailure = error
            }
        }

        // active_write_settle
        log?.finished(offset: offset, length: length)
        locked {
            if copied {
                if case .success = sourceResult, head < tail {
                    state.activeBytesInFlight -= tail - head
                    if let targetFailure {
                        state.dirty.set(state.dirty.chunks(covering: offset + head, length: tail - head))
                        errorAction(isRead: false, error: targetFailure)
                    } else {
                        state.progressCurrent += tail - head
                    }
                }
                state.inFlight.clear(chunks)
            }
            state.filterWrites -= 1
            lock.broadcast()
        }
        if case .failure(let error) = sourceResult { throw error }
        return .done
    }

    /// Whether writes should try the target now: not while the job is stopped by a target
    /// error or backing off after an ignored one, so that a dead target holds no user
    /// write more than once; those writes are tracked dirty instead. Lock held.
    var targetUsable: Bool {
        state.ioStatus == .ok && monotonicNow() >= state.retryAt
    }

    /// An fsync through the mount: in write-blocking mode the target is flushed too
    /// (SPEC 4); a target failure goes to the error policy, never to the user.
    public func flushTargetForUser() {
        guard copyMode == .writeBlocking, lock.withLock({ targetUsable }) else { return }
        if case .failure(let error) = Result(catching: { () throws(Errno) in try target.flush(dataOnly: true) }) {
            locked { errorAction(isRead: false, error: error) }
        }
    }
}
