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

    /// Copies one run: each piece is read and written, and a piece that reads as zeroes (a
    /// hole, or zero data) becomes write-zeroes on the target, so the target stays as sparse
    /// as the source. The source is not asked where its holes are (SEEK_DATA/SEEK_HOLE): on
    /// ext4 each lseek takes the file's position lock and its inode lock, and writes that
    /// fill holes need that inode lock alone, so a resync over a sparse image held 4 writers'
    /// requests for up to 3 s (`tools/restart-test 6 write-blocking kill`: fio's longest
    /// request 2.3–3.0 s with the lseeks, 0.21 s without). Reading a hole costs no disk I/O.
    private func perform(_ op: CopyOperation, buffer: UnsafeMutableRawBufferPointer) -> CopyFailure? {
        var offset = op.offset
        let end = op.offset + op.length
        while offset < end {
            let count = Int(min(end - offset, MirrorState.maxIOBytes))
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
        return nil
    }

    /// Makes the target range read as zeroes, as a hole where the target can.
    private func zeroTarget(at offset: UInt64, length: UInt64) throws(Errno) {
        try writeZeroes(to: target, at: offset, length: length, preferHole: true)
    }
}
