import CNBD
import Foundation
import MirrorCore
import SystemPackage

/// One NBD connection, owned by one I/O thread: callers queue requests and block on
/// their own semaphore; the thread issues up to `maxInFlight` of them with libnbd's aio
/// API, polls the socket and an eventfd, retires completions and enforces deadlines.
/// libnbd 1.14 has no timeout of its own, so a request past its deadline abandons the
/// connection (a hung server) and TCP_USER_TIMEOUT makes a cut link fail as fast. A dead
/// handle cannot be revived: the next request after `retryInterval` opens a new one;
/// requests before that fail at once, so a dead target never holds a writer twice.
final class NBDConnection: @unchecked Sendable {
    static let maxInFlight = 16
    /// The least time between two connection attempts.
    static let retryInterval: Double = 1

    final class Request {
        enum Kind {
            case read(UnsafeMutableRawPointer, count: Int, offset: UInt64)
            case write(UnsafeRawPointer, count: Int, offset: UInt64)
            case zero(count: UInt64, offset: UInt64, flags: UInt32)
            case flush
            case blockStatus(count: UInt64, offset: UInt64, context: UnsafeMutablePointer<UnsafeMutableRawPointer?>)
        }
        let kind: Kind
        let deadline: Double
        /// Set by the I/O thread before `done` is signalled.
        var failure: Errno?
        let done = DispatchSemaphore(value: 0)

        init(kind: Kind, deadline: Double) {
            self.kind = kind
            self.deadline = deadline
        }
    }

    let uri: String
    let size: UInt64
    let timeout: Double

    /// Guards `submitted`, `closing` and `retryRequested`.
    private let lock = ConditionLock<Void>()
    private var submitted: [Request] = []
    private var closing = false
    private var retryRequested = false
    private let wakeFD: Int32

    // Owned by the I/O thread.
    private var handle: OpaquePointer?
    private var waiting: [Request] = []
    private var inFlight: [Int64: Request] = [:]
    private var lastError: Errno = .socketNotConnected
    private var retryAfter: Double = 0

    /// Takes over `handle`, a connected one, and starts the I/O thread.
    init(uri: String, size: UInt64, timeout: Double, handle: OpaquePointer) {
        self.uri = uri
        self.size = size
        self.timeout = timeout
        self.handle = handle
        self.wakeFD = cnbd_eventfd()
        let thread = Thread { [self] in run() }
        thread.name = "nbd-io"
        thread.start()
    }

    /// The eventfd is closed only here, after the I/O thread (which holds `self`) has ended,
    /// so a late `wake()` never writes to a reused descriptor.
    deinit { close(wakeFD) }

    /// Queues `kind` and waits for its result (at most about `timeout` seconds).
    func perform(_ kind: Request.Kind) throws(Errno) {
        let request = Request(kind: kind, deadline: monotonicSeconds() + timeout)
        let accepted = lock.withLock {
            if closing { return false }
            submitted.append(request)
            return true
        }
        guard accepted else { throw .socketNotConnected }
        wake()
        request.done.wait()
        if let failure = request.failure { throw failure }
    }

    /// The next request may reconnect at once (the job was resumed).
    func retryNow() {
        lock.withLock { retryRequested = true }
        wake()
    }

    /// Fails whatever is queued, closes the handle and ends the I/O thread.
    func shutdown() {
        lock.withLock { closing = true }
        wake()
    }

    private func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    // MARK: - The I/O thread

    private func run() {
        while true {
            let (new, stop, retry) = lock.withLock { () -> ([Request], Bool, Bool) in
                defer { submitted.removeAll(keepingCapacity: true); retryRequested = false }
                return (submitted, closing, retryRequested)
            }
            if retry { retryAfter = 0 }
            waiting.append(contentsOf: new)
            if stop {
                disconnect()
                dropConnection(.socketNotConnected)
                for request in waiting { finish(request, .socketNotConnected) }
                waiting.removeAll()
                return
            }
            if handle == nil && !waiting.isEmpty {
                if monotonicSeconds() >= retryAfter { reconnect() }
                if handle == nil {
                    for request in waiting { finish(request, lastError) }
                    waiting.removeAll()
                }
            }
            issueWaiting()
            pollOnce()
            if let handle, nbd_aio_is_dead(handle) != 0 || nbd_aio_is_closed(handle) != 0 {
                retireCompleted()
                dropConnection(lastError)
            }
            let now = monotonicSeconds()
            if inFlight.values.contains(where: { $0.deadline <= now }) {
                dropConnection(.timedOut)
            }
            let late = waiting.filter { $0.deadline <= now }
            if !late.isEmpty {
                waiting.removeAll { $0.deadline <= now }
                for request in late { finish(request, .timedOut) }
            }
        }
    }

    private func issueWaiting() {
        guard let handle else { return }
        while inFlight.count < Self.maxInFlight, !waiting.isEmpty {
            let request = waiting.removeFirst()
            let cookie = issue(request, on: handle)
            if cookie > 0 {
                inFlight[cookie] = request
                continue
            }
            let error = NBDHandle.lastErrno()
            if nbd_aio_is_dead(handle) != 0 || nbd_aio_is_closed(handle) != 0 {
                waiting.insert(request, at: 0)
                dropConnection(error)
                return
            }
            finish(request, error)
        }
    }

    private func issue(_ request: Request, on handle: OpaquePointer) -> Int64 {
        let none = cnbd_no_completion()
        switch request.kind {
        case .read(let buffer, let count, let offset):
            return nbd_aio_pread(handle, buffer, count, offset, none, 0)
        case .write(let buffer, let count, let offset):
            return nbd_aio_pwrite(handle, buffer, count, offset, none, 0)
        case .zero(let count, let offset, let flags):
            return nbd_aio_zero(handle, count, offset, none, flags)
        case .flush:
            return nbd_aio_flush(handle, none, 0)
        case .blockStatus(let count, let offset, let context):
            return cnbd_aio_block_status(handle, count, offset, context)
        }
    }

    /// Waits for the socket, the eventfd or the next deadline, then lets libnbd move.
    private func pollOnce() {
        var fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
        if let handle { fds.append(NBDHandle.socket(of: handle)) }
        var wait = 1.0
        let earliest = inFlight.values.map(\.deadline).min() ?? waiting.map(\.deadline).min()
        if let earliest { wait = min(wait, max(earliest - monotonicSeconds(), 0)) }
        let ready = poll(&fds, nfds_t(fds.count), Int32((wait * 1000).rounded(.up)))
        guard ready > 0 else { return }
        if fds[0].revents != 0 {
            var count: UInt64 = 0
            _ = read(wakeFD, &count, 8)
        }
        guard let handle, fds.count == 2 else { return }
        do {
            try NBDHandle.notify(handle, fds[1].revents)
            retireCompleted()
        } catch {
            // The connection is gone: keep what completed before, fail the rest.
            retireCompleted()
            dropConnection(error)
        }
    }

    private func retireCompleted() {
        guard let handle else { return }
        while true {
            let cookie = nbd_aio_peek_command_completed(handle)
            guard cookie > 0 else { return }
            let result = nbd_aio_command_completed(handle, UInt64(cookie))
            let error: Errno? = result == -1 ? NBDHandle.lastErrno() : nil
            if let request = inFlight.removeValue(forKey: cookie) { finish(request, error) }
        }
    }

    /// Abandons the handle: unsent data is discarded (SO_LINGER 0) so a stale write can
    /// never reach the server after a newer one; every request in flight fails with `error`.
    private func dropConnection(_ error: Errno) {
        lastError = error
        retryAfter = monotonicSeconds() + Self.retryInterval
        guard let handle else { return }
        let fd = nbd_aio_get_fd(handle)
        if fd >= 0 { _ = cnbd_set_linger_reset(fd) }
        nbd_close(handle)
        self.handle = nil
        for request in inFlight.values { finish(request, error) }
        inFlight.removeAll()
    }

    /// A clean end (NBD_CMD_DISC) when nothing is in flight, waiting at most 1 s for it.
    private func disconnect() {
        guard let handle, inFlight.isEmpty, nbd_aio_is_ready(handle) != 0,
              nbd_aio_disconnect(handle, 0) == 0 else { return }
        _ = try? NBDHandle.drive(handle, deadline: monotonicSeconds() + 1) { nbd_aio_is_closed(handle) != 0 }
        nbd_close(handle)
        self.handle = nil
    }

    private func reconnect() {
        do {
            let fresh = try NBDHandle.connect(uri: uri, timeout: timeout)
            guard nbd_get_size(fresh) == Int64(size), nbd_is_read_only(fresh) == 0 else {
                nbd_close(fresh)
                lastError = .ioError
                retryAfter = monotonicSeconds() + Self.retryInterval
                return
            }
            handle = fresh
        } catch {
            lastError = error.errno
            retryAfter = monotonicSeconds() + Self.retryInterval
        }
    }

    private func finish(_ request: Request, _ error: Errno?) {
        request.failure = error
        request.done.signal()
    }
}

/// Opening a libnbd handle with a deadline (nbd_connect_uri itself can block for minutes).
enum NBDHandle {
    struct Failure: Error {
        let errno: Errno
        let message: String
    }

    static func connect(uri: String, timeout: Double) throws(Failure) -> OpaquePointer {
        guard let handle = nbd_create() else { throw Failure(errno: .noMemory, message: lastMessage()) }
        func fail(_ errno: Errno? = nil, _ message: String? = nil) -> Failure {
            let failure = Failure(errno: errno ?? lastErrno(), message: message ?? lastMessage())
            nbd_close(handle)
            return failure
        }
        _ = nbd_set_uri_allow_transports(handle, UInt32(LIBNBD_ALLOW_TRANSPORT_TCP | LIBNBD_ALLOW_TRANSPORT_UNIX))
        _ = nbd_set_uri_allow_tls(handle, LIBNBD_TLS_DISABLE)
        _ = nbd_add_meta_context(handle, LIBNBD_CONTEXT_BASE_ALLOCATION)
        guard nbd_aio_connect_uri(handle, uri) == 0 else { throw fail() }
        let deadline = monotonicSeconds() + timeout
        var timedFD: Int32 = -1
        do {
            try drive(handle, deadline: deadline) {
                let fd = nbd_aio_get_fd(handle)
                if fd >= 0 && fd != timedFD {
                    _ = cnbd_set_tcp_user_timeout(fd, UInt32(timeout * 1000))
                    timedFD = fd
                }
                return nbd_aio_is_ready(handle) != 0
            }
        } catch .timedOut {
            throw fail(.timedOut, "no answer within \(formatSeconds(timeout))")
        } catch {
            throw fail()
        }
        let fd = nbd_aio_get_fd(handle)
        if fd >= 0 && fd != timedFD { _ = cnbd_set_tcp_user_timeout(fd, UInt32(timeout * 1000)) }
        return handle
    }

    /// Runs the handle's state machine on this thread until `done()` holds. Throws
    /// ETIMEDOUT at `deadline`, or the handle's error when it dies.
    static func drive(_ handle: OpaquePointer, deadline: Double, until done: () -> Bool) throws(Errno) {
        while !done() {
            if nbd_aio_is_dead(handle) != 0 || nbd_aio_is_closed(handle) != 0 { throw .ioError }
            let remaining = deadline - monotonicSeconds()
            guard remaining > 0 else { throw .timedOut }
            var pfd = socket(of: handle)
            guard poll(&pfd, 1, Int32(min(remaining, 1) * 1000) + 1) > 0 else { continue }
            try notify(handle, pfd.revents)
        }
    }

    /// The handle's socket with the events libnbd's state machine waits for.
    static func socket(of handle: OpaquePointer) -> pollfd {
        let direction = nbd_aio_get_direction(handle)
        var events: Int16 = 0
        if direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 { events |= Int16(POLLIN) }
        if direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 { events |= Int16(POLLOUT) }
        return pollfd(fd: nbd_aio_get_fd(handle), events: events, revents: 0)
    }

    /// Hands what poll saw on the socket to libnbd, as nbd_poll does. Throws the handle's
    /// error when libnbd fails, ENOTCONN when the socket failed under it.
    static func notify(_ handle: OpaquePointer, _ revents: Int16) throws(Errno) {
        var result: Int32 = 0
        if revents & Int16(POLLIN | POLLHUP) != 0 {
            result = nbd_aio_notify_read(handle)
        } else if revents & Int16(POLLOUT) != 0 {
            result = nbd_aio_notify_write(handle)
        } else if revents & Int16(POLLERR | POLLNVAL) != 0 {
            throw .socketNotConnected
        }
        if result == -1 { throw lastErrno() }
    }

    /// libnbd's errno of this thread's last failed call (EIO when it set none).
    static func lastErrno() -> Errno {
        let code = nbd_get_errno()
        return code > 0 ? Errno(rawValue: code) : .ioError
    }

    static func lastMessage() -> String {
        guard let text = nbd_get_error() else { return "unknown error" }
        return String(cString: text)
    }
}

func formatSeconds(_ seconds: Double) -> String {
    seconds == seconds.rounded() ? "\(Int(seconds)) s" : "\(seconds) s"
}

func monotonicSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}
