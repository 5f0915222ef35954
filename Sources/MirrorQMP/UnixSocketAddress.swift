import Glibc

/// `sockaddr_un` for a path, shared by the server and the CLI's client.
public struct UnixSocketAddress {
    private var storage = sockaddr_un()

    /// Nil when `path` does not fit a unix socket address.
    public init?(path: String) {
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: storage.sun_path) else { return nil }
        storage.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &storage.sun_path) { $0.copyBytes(from: bytes + [0]) }
    }

    /// Calls bind(2) or connect(2) style functions with the address.
    public func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafePointer(to: storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}
