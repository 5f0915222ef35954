import CFuse
import CLinux
import Glibc
import SystemPackage

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

/// One kernel mount served by libfuse's multi-threaded loop.
public final class FUSESession {
    private let session: OpaquePointer
    private let fileSystem: Unmanaged<FUSEFileSystem>
    public let mountpoint: String
    private var mounted = false
    /// Whether the mount ever came up (a `run` that throws before it did mounted nothing).
    public private(set) var didMount = false

    public init(fileSystem: FUSEFileSystem, mountpoint: String, options: MountOptions) throws {
        self.mountpoint = mountpoint
        self.workerThreads = options.workerThreads
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
        if mounted { fuse_session_unmount(session) }
        fuse_session_destroy(session)
        fileSystem.release()
    }

    /// Mounts, serves requests until unmounted or SIGINT/SIGTERM/SIGHUP, then unmounts.
    public func run() throws {
        guard fuse_set_signal_handlers(session) == 0 else {
            throw FUSEError(description: "cannot install signal handlers")
        }
        defer { fuse_remove_signal_handlers(session) }
        // libfuse's handlers only flag the exit; the loop notices when its own thread is
        // interrupted. Any other thread that gets the signal hands it on to this one.
        guard clinux_route_exit_signals_to_this_thread() == 0 else {
            throw FUSEError(description: "cannot install signal handlers")
        }
        guard fuse_session_mount(session, mountpoint) == 0 else {
            throw FUSEError(description: "cannot mount on \(mountpoint) (see the message above)")
        }
        mounted = true
        didMount = true
        let config = fuse_loop_cfg_create()
        defer { fuse_loop_cfg_destroy(config) }
        fuse_loop_cfg_set_max_threads(config, workerThreads)
        // One /dev/fuse descriptor per worker: no contention on a shared read queue.
        fuse_loop_cfg_set_clone_fd(config, 1)
        let status = cfuse_session_loop_mt(session, config)
        fuse_session_unmount(session)
        mounted = false
        if status < 0 {
            throw FUSEError(description: "FUSE session failed: \(String(cString: strerror(-status)))")
        }
    }
}
