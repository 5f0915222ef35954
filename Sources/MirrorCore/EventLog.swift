import Synchronization

/// The job's events as QMP event lines, oldest first, bounded to the most recent
/// `capacity` lines (SPEC section 7: 10,000). Read whole by `.status/events.jsonl`.
public final class EventLog: Sendable {
    public static let defaultCapacity = 10_000
    public let capacity: Int

    private struct Ring {
        var lines: [String] = []
        var start = 0  // index of the oldest line once the ring is full
    }
    private let ring = Mutex(Ring())

    public init(capacity: Int = EventLog.defaultCapacity) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    public func append(_ line: String) {
        ring.withLock { r in
            if r.lines.count < capacity {
                r.lines.append(line)
            } else {
                r.lines[r.start] = line
                r.start = (r.start + 1) % capacity
            }
        }
    }

    /// All lines, oldest first, each ended by a newline.
    public func text() -> String {
        ring.withLock { r in
            var out = ""
            for i in 0..<r.lines.count {
                out += r.lines[(r.start + i) % r.lines.count]
                out += "\n"
            }
            return out
        }
    }
}
