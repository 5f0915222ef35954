import Foundation

/// systemd's readiness protocol (sd_notify(3)), spoken directly: one datagram of
/// `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for
/// the abstract namespace). Without the variable every call does nothing. Sends never
/// block and never fail the daemon: a manager that went away only loses the message.
final class SystemdNotify: Sendable {
    static let shared = SystemdNotify(socketName: ProcessInfo.processInfo.environment["NOTIFY_SOCKET"])

    private let address: [UInt8]?

    init(socketName: String?) {
        guard let name = socketName, !name.isEmpty, name.hasPrefix("/") || name.hasPrefix("@") else {
            address = nil
            return
        }
        var bytes = Array(name.utf8)
        // An abstract socket's name starts with a NUL byte, not with '@'.
        if bytes[0] == UInt8(ascii: "@") { bytes[0] = 0 }
        address = bytes.count < 108 ? bytes : nil
    }

    var isEnabled: Bool { address != nil }

    /// The mount and the control socket are usable.
    func ready(status: String, mainPID: pid_t = getpid()) { send("READY=1\nSTATUS=\(status)\nMAINPID=\(mainPID)") }

    /// A line for `systemctl status`.
    func status(_ text: String) { send("STATUS=\(text)") }

    /// The daemon has begun to unmount.
    func stopping() { send("STOPPING=1\nSTATUS=unmounting") }

    private func send(_ message: String) {
        guard let address else { return }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &sun.sun_path) { path in
            for (i, byte) in address.enumerated() { path[i] = byte }
        }
        // An abstract name's length counts exactly its bytes; a path's includes the NUL.
        let length = MemoryLayout<sa_family_t>.size + address.count + (address.first == 0 ? 0 : 1)
        let bytes = Array(message.utf8)
        _ = withUnsafePointer(to: &sun) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sockaddr in
                bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT), sockaddr, socklen_t(length)) }
            }
        }
    }
}
