import Foundation
import Glibc
import MirrorCore
import Synchronization

/// QEMU's Machine Protocol on a unix socket (mode 0600). One accept thread; per client a
/// reader thread (framing, dispatch) and a writer thread draining a bounded outbox, so a
/// client that stops reading can never block the job that emits events — it is dropped.
public final class QMPServer: Sendable {
    /// Largest accepted message; a client sending more is told so and disconnected.
    public static let maximumMessageSize = 1 << 20
    /// Replies and events queued for one client before it counts as stuck and is dropped.
    static let maximumOutbox = 4 << 20
    static let maximumClients = 256

    public let path: String
    private let listener: Int32
    private let commands: QMPCommands
    private let clients = Mutex<[ObjectIdentifier: QMPConnection]>([:])

    /// Binds `path` (a stale socket file there is replaced) and starts accepting.
    public init(path: String, commands: QMPCommands) throws {
        self.path = path
        self.commands = commands
        guard let address = UnixSocketAddress(path: path) else {
            throw QMPServerError("socket path '\(path)' is longer than a unix socket allows")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw QMPServerError("socket: \(String(cString: strerror(errno)))") }
        var st = stat()
        if lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
        // Create the socket file with no access for others from the start.
        let oldMask = umask(0o177)
        let bound = address.withSockaddr { bind(fd, $0, $1) }
        umask(oldMask)
        guard bound == 0, listen(fd, 64) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw QMPServerError("cannot listen on '\(path)': \(reason)")
        }
        listener = fd
        let acceptor = Thread { [self] in acceptLoop() }
        acceptor.name = "qmp-accept"
        acceptor.start()
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE {
                    if errno == EMFILE || errno == ENFILE { usleep(100_000) }
                    continue
                }
                return
            }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            // A client that stops reading cannot hold its writer thread forever.
            var timeout = timeval(tv_sec: 30, tv_usec: 0)
            setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let accepted: QMPConnection? = clients.withLock { all in
                guard all.count < Self.maximumClients else { return nil }
                let connection = QMPConnection(fd: client, commands: commands) { [weak self] c in
                    _ = self?.clients.withLock { $0.removeValue(forKey: ObjectIdentifier(c)) }
                }
                all[ObjectIdentifier(connection)] = connection
                return connection
            }
            if let accepted { accepted.start() } else { close(client) }
        }
    }

    /// Sends an event to every client that finished capabilities negotiation.
    public func broadcast(_ event: JobEvent) {
        let line = event.jsonLine
        for client in clients.withLock({ Array($0.values) }) { client.sendEvent(line) }
    }

    /// Stops serving: no new client, and every connection is shut down (its threads end
    /// and close it).
    public func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        commands.close()
        for client in clients.withLock({ Array($0.values) }) { client.shutDown() }
    }

    public func removeSocketFile() {
        unlink(path)
    }
}

public struct QMPServerError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// One client: its negotiation state, its reader and writer threads, its outbox.
final class QMPConnection: Sendable {
    private let fd: Int32
    private let commands: QMPCommands
    private let onClose: @Sendable (QMPConnection) -> Void
    private let outboxLock = ConditionLock<Void>()
    private struct Outbox {
        var messages: [[UInt8]] = []
        var bytes = 0
        var closed = false
        var negotiated = false
        /// The reader and the writer: the descriptor is closed when both have ended, and
        /// never used after (a closed number may already name another client's socket).
        var threadsRunning = 2
        var descriptorOpen = true
    }
    private nonisolated(unsafe) var outbox = Outbox()  // guarded by outboxLock

    init(fd: Int32, commands: QMPCommands, onClose: @escaping @Sendable (QMPConnection) -> Void) {
        self.fd = fd
        self.commands = commands
        self.onClose = onClose
    }

    func start() {
        enqueue(commands.greeting().compactText)
        let writer = Thread { [self] in writeLoop() }
        writer.name = "qmp-writer"
        writer.start()
        let reader = Thread { [self] in readLoop() }
        reader.name = "qmp-reader"
        reader.start()
    }

    func sendEvent(_ line: String) {
        let negotiated = outboxLock.withLock { outbox.negotiated }
        if negotiated { enqueue(line) }
    }

    /// Queues one message (CRLF-terminated, as QEMU sends them). A client whose outbox
    /// overflows is disconnected.
    private func enqueue(_ text: String) {
        let bytes = Array((text + "\r\n").utf8)
        outboxLock.withLock {
            guard !outbox.closed else { return }
            if outbox.bytes + bytes.count > QMPServer.maximumOutbox {
                outbox.closed = true
                if outbox.descriptorOpen { shutdown(fd, Int32(SHUT_RDWR)) }
            } else {
                outbox.messages.append(bytes)
                outbox.bytes += bytes.count
            }
            outboxLock.broadcast()
        }
    }

    private func writeLoop() {
        while true {
            let batch: [[UInt8]]? = outboxLock.withLock {
                while outbox.messages.isEmpty && !outbox.closed { outboxLock.wait() }
                if outbox.messages.isEmpty { return nil }
                defer { outbox.messages.removeAll(); outbox.bytes = 0 }
                return outbox.messages
            }
            guard let batch else { break }
            for message in batch where !sendAll(message) {
                outboxLock.withLock {
                    outbox.closed = true
                    shutdown(fd, Int32(SHUT_RDWR))  // the reader's recv returns
                }
                break
            }
        }
        finish()
    }

    /// Ends the connection from the server's side.
    func shutDown() {
        outboxLock.withLock {
            outbox.closed = true
            if outbox.descriptorOpen { shutdown(fd, Int32(SHUT_RDWR)) }
            outboxLock.broadcast()
        }
    }

    /// One of the two threads ended; the last one closes the descriptor.
    private func finish() {
        let last = outboxLock.withLock {
            outbox.threadsRunning -= 1
            guard outbox.threadsRunning == 0 else { return false }
            close(fd)
            outbox.descriptorOpen = false
            return true
        }
        if last { onClose(self) }
    }

    private func sendAll(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            sent += n
        }
        return true
    }

    private func readLoop() {
        var framer = QMPFramer(maximumSize: QMPServer.maximumMessageSize)
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        var session = QMPSession()
        reading: while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            let frames: [[UInt8]]
            do {
                frames = try framer.feed(chunk[0..<n])
            } catch {
                enqueue(QMPError.generic("JSON parse error, message too large").reply(id: nil).compactText)
                break reading
            }
            for frame in frames {
                let reply = commands.handle(frame, session: &session)
                if session.negotiated { outboxLock.withLock { outbox.negotiated = true } }
                if let reply { enqueue(reply.compactText) }
                if session.quitRequested {
                    commands.quit()
                }
            }
        }
        outboxLock.withLock {
            outbox.closed = true
            outboxLock.broadcast()
        }
        finish()
    }
}
