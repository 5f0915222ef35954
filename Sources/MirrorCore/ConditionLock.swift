import Glibc

/// A mutex with one or more condition variables, owning the value it guards: only code inside
/// `withLock` can touch it. Waits are part of a locked section (`withLock(waiting:)`): the
/// section says it must wait, the lock waits for a broadcast (or a timeout) and runs the
/// section again, so a waiter re-checks what it waits for after every wake-up, never holds
/// a claim while it waits, and no chain of waiters can deadlock (the failure QEMU fixed
/// twice in 2021).
public final class ConditionLock<Value>: @unchecked Sendable {
    // Heap-allocated: pthread objects must not move.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    /// `conditions` condition variables: waiters of different kinds wait on different ones,
    /// so a change one kind waits for wakes no other.
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private let conditions: Int
    /// Guarded by `mutex`.
    private var value: Value

    public init(_ value: Value, conditions: Int = 1) {
        precondition(conditions >= 1)
        self.value = value
        self.conditions = conditions
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: conditions)
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        for index in 0..<conditions { pthread_cond_init(condition + index, &attributes) }
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        for index in 0..<conditions { pthread_cond_destroy(condition + index) }
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }

    /// What a locked section decided: done with a result, or wait and run again.
    public enum Decision<R> {
        case done(R)
        /// Wait for a broadcast (or signal) of condition `on`, or at most `timeout` seconds,
        /// then run the section again.
        case wait(timeout: Double?, on: Int = 0)
    }

    /// Runs `body` under the lock until it is done; each time it asks to wait, the lock is
    /// released until a broadcast or the timeout.
    public func withLock<R>(waiting body: (inout Value) -> Decision<R>) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while true {
            switch body(&value) {
            case .done(let result): return result
            case .wait(let timeout, let on): waitLocked(timeout: timeout, on: on)
            }
        }
    }

    /// Wakes every waiter on condition `on`; call with the lock held or just after releasing it.
    public func broadcast(_ on: Int = 0) {
        pthread_cond_broadcast(condition + on)
    }

    /// Wakes one waiter on condition `on` (each waiter re-checks, so one that finds nothing
    /// to do waits again).
    public func signal(_ on: Int = 0) {
        pthread_cond_signal(condition + on)
    }

    private func waitLocked(timeout: Double?, on: Int = 0) {
        let condition = condition + on
        guard let timeout else {
            pthread_cond_wait(condition, mutex)
            return
        }
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let nanos = Int(deadline.tv_nsec) + Int(max(0, min(timeout, 3600)) * 1e9)
        deadline.tv_sec += nanos / 1_000_000_000
        deadline.tv_nsec = nanos % 1_000_000_000
        pthread_cond_timedwait(condition, mutex, &deadline)
    }
}

/// A lock whose guarded state lives outside it (the fields of its owner, documented there).
extension ConditionLock where Value == Void {
    public convenience init() { self.init(()) }

    public func withLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    /// Waits for a broadcast; the lock must be held. Returns after `timeout` seconds at most.
    public func wait(timeout: Double? = nil) { waitLocked(timeout: timeout) }
}

/// The engine's time, in seconds: rate limiting, back-off, the log's sweeps and the job's
/// age read it. Production uses the monotonic clock; tests drive a manual one.
public protocol JobClock: Sendable {
    func now() -> Double
}

/// CLOCK_MONOTONIC.
public struct MonotonicClock: JobClock {
    public init() {}
    public func now() -> Double { monotonicNow() }
}

/// Seconds on the monotonic clock.
func monotonicNow() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}
