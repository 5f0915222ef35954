/// Bytes per second over the last `span` seconds, kept in one-second buckets (SPEC 10:
/// dirty-rate and copy-rate are over the last 10 s).
struct RateWindow: Sendable, Equatable {
    static let span = 10
    private var bytes = [UInt64](repeating: 0, count: span)
    private var seconds = [Int](repeating: Int.min, count: span)

    mutating func add(_ count: UInt64, now: Double) {
        guard count > 0 else { return }
        let second = Int(now.rounded(.down))
        let index = ((second % Self.span) + Self.span) % Self.span
        if seconds[index] != second {
            seconds[index] = second
            bytes[index] = 0
        }
        bytes[index] += count
    }

    /// The rate over the window, or over the time since `start` when that is shorter (a
    /// young job's rate is not diluted by seconds it did not exist).
    func rate(now: Double, since start: Double) -> Double {
        let second = Int(now.rounded(.down))
        var sum: UInt64 = 0
        for index in 0..<Self.span where seconds[index] > second - Self.span && seconds[index] <= second {
            sum += bytes[index]
        }
        // The buckets cover the span's whole seconds before this one, and this one so far.
        let window = min(Double(Self.span - 1) + (now - Double(second)), now - start)
        return window > 0 ? Double(sum) / window : 0
    }
}

/// The job's forecast (SPEC 10): how fast writes dirty clean regions, how fast the job
/// copies, and from what is left, whether and when the target catches up. Built from what
/// is left to copy (dirty and in flight) and the two rates, never from the progress fraction.
public struct JobForecast: Sendable, Equatable {
    /// User writes that dirtied clean chunks, bytes/s over the last 10 s.
    public var dirtyRate: Double
    /// Bytes written to the target (background copies and mirrored writes), bytes/s over the last 10 s.
    public var copyRate: Double
    /// The copy gains on the writes: what is left shrinks.
    public var converging: Bool
    /// Seconds until nothing is left at the current rates: 0 when nothing is left, nil
    /// while not converging.
    public var etaSeconds: Double?

    /// Converging needs a real margin: at an equilibrium (every copied chunk dirtied again
    /// as fast) the two rates are equal give or take noise, and what is left never shrinks.
    static let margin = 0.1
}

extension MirrorState {
    /// The forecast at `now`. A paused or stopped job does not converge.
    func forecast(now: Double) -> JobForecast {
        let dirtyRate = dirtyWindow.rate(now: now, since: createdAt)
        let copyRate = copyWindow.rate(now: now, since: createdAt)
        let left = dirty.dirtyBytes + bytesInFlight + activeBytesInFlight
        let halted = userPaused || ioStatus != .ok || status == .paused || status == .standby
        if left == 0 && !halted { return JobForecast(dirtyRate: dirtyRate, copyRate: copyRate, converging: true, etaSeconds: 0) }
        let net = copyRate - dirtyRate
        let converging = !halted && copyRate > 0 && net > JobForecast.margin * copyRate
        return JobForecast(dirtyRate: dirtyRate, copyRate: copyRate, converging: converging,
                           etaSeconds: converging ? Double(left) / net : nil)
    }

    /// `--auto-write-blocking`: a background job that has not converged for the option's
    /// time switches itself to write-blocking, once, and says so. Writes are mirrored from
    /// then on, so only the copier's work is left and the job reaches ready under any load
    /// the source takes.
    mutating func autoWriteBlocking(now: Double) {
        guard let after = options.autoWriteBlockingAfter, copyMode == .background, pendingExit == nil else {
            notConvergingSince = nil
            return
        }
        let forecast = forecast(now: now)
        if forecast.converging || userPaused || ioStatus != .ok {
            notConvergingSince = nil
            return
        }
        guard let since = notConvergingSince else {
            notConvergingSince = now
            return
        }
        guard now - since >= after else { return }
        copyMode = .writeBlocking
        notConvergingSince = nil
        emit(.autoWriteBlocking(device: id, seconds: after, dirtyRate: UInt64(forecast.dirtyRate),
                                copyRate: UInt64(forecast.copyRate)))
    }
}
