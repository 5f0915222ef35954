/// mirror_iteration: pick the next run of dirty chunks, claim it, queue it for a copy worker.
extension MirrorState {
    /// Claims the next run of dirty chunks and queues it. Returns false when the next dirty
    /// chunk is busy or the copy buffer is full.
    mutating func iterate() -> Bool {
        guard let first = dirty.nextDirty(from: cursor) else { return false }
        // Background copies wait only for their first chunk (and never take one a
        // write-blocking write is waiting for).
        guard !inFlight.isDirty(first), !isWaitedForByActiveWrite(first) else {
            cursor = first + 1 < dirty.chunkCount ? first + 1 : 0
            return false
        }
        var end = first + 1
        while end < dirty.chunkCount, end - first < maxRunChunks, dirty.isDirty(end),
              !inFlight.isDirty(end), !isWaitedForByActiveWrite(end) {
            end += 1
        }
        let chunks = first..<end
        let offset = UInt64(first) * options.granularity
        let length = min(UInt64(end) * options.granularity, size) - offset
        // The copy buffer (buf-size) bounds the bytes in flight; one run always fits.
        guard bytesInFlight == 0 || bytesInFlight + length <= options.bufSize else { return false }
        // Clear the dirty bits before reading: a write racing with the copy re-dirties
        // its chunk, so it is copied again.
        dirty.clear(chunks)
        inFlight.set(chunks)
        cursor = end < dirty.chunkCount ? end : 0
        backgroundOps += 1
        bytesInFlight += length
        if speed > 0 && !synced { allowance -= Double(length) }
        queue.append(CopyOperation(chunks: chunks, offset: offset, length: length))
        return true
    }

    func isWaitedForByActiveWrite(_ chunk: Int) -> Bool {
        waitingActive.contains { $0.contains(chunk) }
    }

    /// mirror_throttle's token bucket for `speed`: seconds to wait before the next
    /// operation may start.
    mutating func rateLimitDelay(now: Double) -> Double {
        guard speed > 0 else { return 0 }
        let rate = Double(speed)
        // At most one slice of burst, as QEMU's slice quota.
        allowance = min(allowance + (now - allowanceTime) * rate, rate * Self.sliceTime)
        allowanceTime = now
        return allowance > 0 ? 0 : -allowance / rate
    }
}
