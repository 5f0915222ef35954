import SystemPackage

/// A background copy that failed, and on which side.
struct CopyFailure: Sendable, Equatable {
    let isRead: Bool
    let error: Errno
}

/// The copy workers: take a queued operation, copy it (mirror_co_read / mirror_co_zero_or_discard),
/// report it (mirror_iteration_done).
extension MirrorState {
    /// The next queued operation; nil when the workers are to exit.
    mutating func nextCopy() -> ConditionLock<MirrorState>.Decision<CopyOperation?> {
        if !queue.isEmpty { return .done(queue.removeFirst()) }
        return copiersExit ? .done(nil) : .wait(timeout: nil, on: Wake.copiers.rawValue)
    }

    /// mirror_iteration_done: release the chunks; on failure re-dirty and apply the policy.
    mutating func copyDone(_ op: CopyOperation, failure: CopyFailure?, now: Double) {
        inFlight.clear(op.chunks)
        backgroundOps -= 1
        bytesInFlight -= op.length
        if let failure {
            dirty.set(op.chunks)
            errorAction(isRead: failure.isRead, error: failure.error, now: now)
        } else {
            progressCurrent += op.length
            copyWindow.add(op.length, now: now)
            retryBackoff = 0.05
        }
    }
}

extension MirrorJob {
    func copyWorker() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(MirrorState.maxIOBytes), alignment: 4096)
        defer { buffer.deallocate() }
        while let operation = state.withLock(waiting: { $0.nextCopy() }) {
            let failure = perform(operation, buffer: buffer)
            let now = clock.now()
            // The job thread starts the next copy; writes may wait for these chunks.
            locked(wake: [.job, .writers]) { $0.copyDone(operation, failure: failure, now: now) }
        }
    }

    /// Copies one run: data ranges are read and written (all-zero data becomes a hole),
    /// holes are punched, so the target stays as sparse as the source.
    private func perform(_ op: CopyOperation, buffer: UnsafeMutableRawBufferPointer) -> CopyFailure? {
        var offset = op.offset
        let end = op.offset + op.length
        while offset < end {
            let (isData, extentEnd) = sourceExtent(at: offset, limit: end)
            if !isData {
                do { try zeroTarget(at: offset, length: extentEnd - offset) } catch { return CopyFailure(isRead: false, error: error) }
                offset = extentEnd
                continue
            }
            while offset < extentEnd {
                let count = Int(min(extentEnd - offset, MirrorState.maxIOBytes))
                let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
                do {
                    let got = try source.read(into: piece, at: offset, cache: .direct)
                    guard got == count else { return CopyFailure(isRead: true, error: .ioError) }
                } catch {
                    return CopyFailure(isRead: true, error: error)
                }
                do {
                    if isAllZero(UnsafeRawBufferPointer(piece)) {
                        try zeroTarget(at: offset, length: UInt64(count))
                    } else {
                        try target.write(UnsafeRawBufferPointer(piece), at: offset, cache: .direct)
                    }
                } catch {
                    return CopyFailure(isRead: false, error: error)
                }
                offset += UInt64(count)
            }
        }
        return nil
    }

    /// Whether `offset` starts data or a hole in the source, and where that extent ends.
    private func sourceExtent(at offset: UInt64, limit: UInt64) -> (isData: Bool, end: UInt64) {
        let dataStart: UInt64
        do {
            dataStart = try source.seek(.data, from: offset)
        } catch .noSuchAddressOrDevice {
            return (false, limit)  // only a hole follows
        } catch {
            return (true, limit)   // cannot tell: treat as data and let the read decide
        }
        if dataStart > offset { return (false, min(dataStart, limit)) }
        let holeStart = (try? source.seek(.hole, from: offset)) ?? limit
        return (true, min(max(holeStart, offset + 1), limit))
    }

    /// Makes the target range read as zeroes, as a hole where the target can.
    private func zeroTarget(at offset: UInt64, length: UInt64) throws(Errno) {
        try writeZeroes(to: target, at: offset, length: length, preferHole: true)
    }
}
