import CFuse
import CLinux
import Glibc
import Synchronization
import SystemPackage
import CFuseChannel

/// Mount options, set in one place.
public struct MountOptions: Sendable {
    public var readOnly = false
    public var allowOther = false
    /// Source path, shown as the mount's fsname (`mount`, /proc/mounts).
    public var fsName: String
    public var workerThreads: UInt32 = 16

    public init(fsName: String) { self.fsName = fsName }

    var kernelOptions: String {
        var options = [
            "fsname=" + fsName.split(separator: ",", omittingEmptySubsequences: false).joined(separator: "\\,"),
            "subtype=mirrorfs",
            // The kernel checks the image's mode bits for every user, as on a local file.
            "default_permissions",
        ]
        if readOnly { options.append("ro") }
        if allowOther { options.append("allow_other") }
        return options.joined(separator: ",")
    }
}

public struct FUSEError: Error, CustomStringConvertible {
    public let description: String
}

/// A connection a server that died left behind: the descriptor (held by the keeper and
/// inherited), and the FUSE_INIT request its first server read, byte for byte.
public struct Takeover: Sendable {
    public let fuseFD: Int32
    public let initRequest: [UInt8]
    public init(fuseFD: Int32, initRequest: [UInt8]) {
        self.fuseFD = fuseFD
        self.initRequest = initRequest
    }
}

/// How a session's loop ended.
public enum SessionEnd: Sendable, Equatable {
    /// The kernel ended the connection (an unmount, an abort).
    case disconnected
    /// SIGINT, SIGTERM or SIGHUP: the mount is to end.
    case signalled
    /// SIGUSR1: another server takes the connection over; the mount stays.
    case handOver
}

/// What the init callback does once libfuse has taken the (kernel's or replayed) INIT:
/// set by `FUSESession.run` before the loop reads anything.
final class SessionInitialisation: Sendable {
    static let shared = SessionInitialisation()
    private let action = Mutex<(@Sendable () -> Void)?>(nil)
    func set(_ body: @escaping @Sendable () -> Void) { action.withLock { $0 = body } }
    func run() { action.withLock { $0 }?() }
}

/// One kernel mount served by libfuse's multi-threaded loop, through the custom io of
/// `CFuseChannel` so that another server can take the connection over.
public final class FUSESession {
    private let session: OpaquePointer
    private let fileSystem: Unmanaged<FUSEFileSystem>
    public let mountpoint: String
    private let takeover: Takeover?
    /// Whether the mount ever came up (a `run` that throws before it did mounted nothing).
    public private(set) var didMount = false
    /// (One session per process: the channel's record is the process's.)
    /// The INIT this connection was initialised with (the kernel's, or the replayed one).
    public static var initRequest: [UInt8] { Self.recorded(cfc_recorded_init) }
    /// libfuse's reply to it (for a replay: what it would have answered). libfuse sends it
    /// after the init callback: this waits for it, at most `seconds`.
    public static func initReply(waiting seconds: Double) -> [UInt8] {
        Self.recorded { cfc_recorded_init_reply($0, $1, Int32(seconds * 1000)) }
    }
    /// Whether the kernel can resend the requests a dead server had read (FUSE_HAS_RESEND).
    public static var kernelResends: Bool {
        let bytes = initRequest
        return bytes.withUnsafeBytes { cfc_init_offers_resend($0.baseAddress, $0.count) } != 0
    }

    public init(fileSystem: FUSEFileSystem, mountpoint: String, options: MountOptions, takeover: Takeover? = nil) throws {
        self.mountpoint = mountpoint
        self.workerThreads = options.workerThreads
        self.takeover = takeover
        let userdata = Unmanaged.passRetained(fileSystem)
        let words: [String] = ["mirrorfs", "-o", options.kernelOptions]
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) }
        defer { argv.forEach { free($0) } }
        var ops = makeLowLevelOperations()
        var cArgv = argv + [nil as UnsafeMutablePointer<CChar>?]
        let created = cArgv.withUnsafeMutableBufferPointer { buffer -> OpaquePointer? in
            var args = fuse_args(argc: Int32(argv.count), argv: buffer.baseAddress, allocated: 0)
            defer { fuse_opt_free_args(&args) }
            return fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, userdata.toOpaque())
        }
        guard let created else {
            userdata.release()
            throw FUSEError(description: "cannot create the FUSE session (see the message above)")
        }
        session = created
        self.fileSystem = userdata
    }

    private let workerThreads: UInt32

    deinit {
        fuse_session_destroy(session)
        fileSystem.release()
    }

    private static func recorded(_ copy: (UnsafeMutableRawPointer?, Int) -> Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 512)
        let count = bytes.withUnsafeMutableBytes { copy($0.baseAddress, $0.count) }
        return Array(bytes.prefix(count))
    }

    /// Mounts (or takes the connection over), serves requests until the connection ends or
    /// a signal ends the loop, and says which. The mount is left in place: `detach` ends it.
    /// `connected` gets the descriptor before any request is read (the keeper's copy). In
    /// the init callback, before the file system's `onReady`, a takeover has the kernel
    /// resend, and the other readers go on.
    public func run(connected: (Int32) throws -> Void) throws -> SessionEnd {
        guard fuse_set_signal_handlers(session) == 0 else {
            throw FUSEError(description: "cannot install signal handlers")
        }
        defer { fuse_remove_signal_handlers(session) }
        // libfuse's handlers only flag the exit; the loop notices when its own thread is
        // interrupted. Any other thread that gets the signal hands it on to this one.
        guard clinux_route_exit_signals_to_this_thread() == 0 else {
            throw FUSEError(description: "cannot install signal handlers")
        }
        let fd: Int32
        if let takeover {
            fd = takeover.fuseFD
            takeover.initRequest.withUnsafeBytes { cfc_configure($0.baseAddress, $0.count) }
        } else {
            guard fuse_session_mount(session, mountpoint) == 0 else {
                throw FUSEError(description: "cannot mount on \(mountpoint) (see the message above)")
            }
            fd = fuse_session_fd(session)
            cfc_configure(nil, 0)
        }
        didMount = true
        try connected(fd)
        var io = fuse_custom_io()
        io.read = cfc_read
        io.writev = cfc_writev
        // Requests are read on this descriptor (the keeper's open file), never on clones
        // of it: what a dead server had read stays on a queue the kernel can resend from.
        guard fuse_session_custom_io(session, &io, fd) == 0 else {
            throw FUSEError(description: "cannot serve the FUSE descriptor \(fd)")
        }
        let resend = takeover != nil
        SessionInitialisation.shared.set {
            if resend { _ = cfc_notify_resend(fd) }
            cfc_release_readers()
        }
        let config = fuse_loop_cfg_create()
        defer { fuse_loop_cfg_destroy(config) }
        fuse_loop_cfg_set_max_threads(config, workerThreads)
        fuse_loop_cfg_set_clone_fd(config, 0)
        let status = cfuse_session_loop_mt(session, config)
        if clinux_hand_over_requested() != 0 { return .handOver }
        if clinux_exit_signal_received() != 0 { return .signalled }
        if status < 0 {
            throw FUSEError(description: "FUSE session failed: \(String(cString: strerror(-status)))")
        }
        return .disconnected
    }

    /// Ends the mount (lazily, as libfuse does): umount2 as root, else fusermount3.
    public static func detach(mountpoint: String) {
        if geteuid() == 0 {
            _ = umount2(mountpoint, Int32(MNT_DETACH))
            return
        }
        var pid: pid_t = 0
        let words = ["fusermount3", "-u", "-q", "-z", "--", mountpoint]
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        guard posix_spawnp(&pid, "fusermount3", nil, nil, argv, environ) == 0 else { return }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }
}
