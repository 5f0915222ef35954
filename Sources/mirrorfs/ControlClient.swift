import CLinux
import Foundation
import MirrorCore
import MirrorQMP
import MirrorSetup

/// A blocking QMP client for the CLI: finds the daemon's socket from MOUNTPOINT (the
/// root's `user.mirrorfs.qmp` attribute), negotiates, runs commands, and collects events.
/// Every step has a deadline: a daemon that does not answer is named, never waited on.
final class ControlClient {
    /// Seconds the daemon has to answer one command (or the mount one attribute read).
    static let replyDeadline: Double = 30
    private let fd: Int32
    private let mountpoint: String
    private var pending: [UInt8] = []
    /// Events received while waiting for replies, oldest first.
    private(set) var events: [JSONValue] = []

    /// Seconds this client waits for one reply.
    private let deadline: Double

    init(mountpoint: String, deadline: Double = ControlClient.replyDeadline) throws {
        self.mountpoint = mountpoint
        self.deadline = deadline
        let path = try Self.rootAttribute(RootAttribute.qmp, of: mountpoint, deadline: deadline)
        guard let address = UnixSocketAddress(path: path) else {
            throw CLIError("the daemon's socket path '\(path)' is too long")
        }
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw CLIError("socket: \(String(cString: strerror(errno)))") }
        var timeout = timeval(tv_sec: Int(deadline), tv_usec: Int((deadline - deadline.rounded(.down)) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard address.withSockaddr({ connect(fd, $0, $1) }) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw CLIError("cannot reach the daemon of '\(mountpoint)' at \(path): \(reason)")
        }
        _ = try readMessage()  // greeting
        _ = try execute("qmp_capabilities")
    }

    deinit { close(fd) }

    /// A root attribute of the mount, read on a thread of its own: a mount whose daemon is
    /// stopped would block the read forever.
    static func rootAttribute(_ name: String, of mountpoint: String, deadline: Double = replyDeadline) throws -> String {
        switch MountTable.readRootAttribute(name, of: mountpoint, timeout: deadline) {
        case .value(let value):
            return value
        case .failed(let reason) where MountTable.daemonGone(reason):
            let resolved = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
            let source = MountTable.mirrorfsMounts().first { $0.mountpoint == resolved }?.source ?? "SOURCE"
            throw CLIError("the daemon of '\(mountpoint)' is gone (the mount is stale): 'mirrorfs mount \(source) \(mountpoint)' mounts it again, with the same --target to resume its job")
        case .failed(let reason):
            throw CLIError("'\(mountpoint)' is not a mirrorfs mount (\(String(cString: strerror(reason))))")
        case .timedOut:
            throw CLIError("the mount '\(mountpoint)' does not answer (its daemon may be stopped)")
        }
    }

    /// Runs a command; a QMP error becomes the CLI's one-line error.
    @discardableResult
    func execute(_ command: String, _ arguments: [(String, JSONValue)] = []) throws -> JSONValue {
        var message: [(String, JSONValue)] = [("execute", .string(command))]
        if !arguments.isEmpty { message.append(("arguments", .object(arguments))) }
        let bytes = Array((JSONValue.object(message).compactText + "\n").utf8)
        guard bytes.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == bytes.count else {
            throw CLIError("the daemon closed the control connection")
        }
        while true {
            let reply = try readMessage()
            if reply["event"] != nil { events.append(reply); continue }
            if let value = reply["return"] { return value }
            if case .string(let desc)? = reply["error"]?["desc"] { throw CLIError(desc) }
            throw CLIError("unexpected reply from the daemon: \(reply.compactText)")
        }
    }

    /// Waits for the next event (or `timeout` seconds); nil on timeout.
    func nextEvent(timeout: Double) throws -> JSONValue? {
        if !events.isEmpty { return events.removeFirst() }
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        if pending.firstIndex(of: 0x0a) == nil {
            guard poll(&poller, 1, Int32(timeout * 1000)) > 0 else { return nil }
        }
        let message = try readMessage()
        return message["event"] != nil ? message : nil
    }

    private func readMessage() throws -> JSONValue {
        while true {
            if let newline = pending.firstIndex(of: 0x0a) {
                let line = Array(pending[..<newline])
                pending.removeFirst(newline + 1)
                do {
                    return try QMPJSONParser.parse(line)
                } catch {
                    throw CLIError("unreadable reply from the daemon")
                }
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = recv(fd, &chunk, chunk.count, 0)
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                throw CLIError("the daemon of '\(mountpoint)' did not answer within \(Int(deadline)) s")
            }
            guard n > 0 else { throw CLIError("the daemon closed the control connection") }
            pending += chunk[0..<n]
        }
    }

    /// The job the mount runs, as query-block-jobs shows it; nil when there is none.
    func currentJob() throws -> JSONValue? {
        guard case .array(let jobs) = try execute("query-block-jobs") else { return nil }
        return jobs.first
    }

    func requireJobID() throws -> String {
        guard case .string(let id)? = try currentJob()?["device"] else { throw CLIError("no job runs on this mount") }
        return id
    }
}
