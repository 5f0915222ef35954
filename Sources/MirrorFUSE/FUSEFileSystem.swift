import CFuse
import Glibc
import MirrorCore
import Synchronization
import SystemPackage

/// The mount's fixed tree (hello_ll style: constant inode numbers, no inode table).
enum Node: fuse_ino_t {
    case root = 1
    case image = 2
    case statusDirectory = 3
    case jobJSON = 4
    case eventsJSONL = 5
    case metricsProm = 6

    static let statusDirectoryName = ".status"
    static let jobJSONName = "job.json"
    static let eventsJSONLName = "events.jsonl"
    static let metricsPromName = "metrics.prom"

    /// The status files, each read as one snapshot per open.
    var isStatusFile: Bool { self == .jobJSON || self == .eventsJSONL || self == .metricsProm }
}

/// State the FUSE callbacks reach through `fuse_req_userdata`: the filter every image
/// request goes through, the image's presentation, and snapshots of open status files.
public final class FUSEFileSystem: Sendable {
    public let filter: MirrorFilter
    /// The image's file name in the mount (SOURCE's file name).
    public let imageName: String
    /// Ownership and permission bits the image shows: those of SOURCE at mount time.
    let owner: (uid: uid_t, gid: gid_t)
    let imagePermissions: mode_t
    let mountTime: timespec
    /// The QMP socket's path, published as the root's `user.mirrorfs.qmp` attribute so that
    /// `mirrorfs job|status MOUNTPOINT` find it from the mount alone.
    let controlSocket: String?
    public static let controlSocketAttribute = RootAttribute.qmp
    /// The serving daemon's pid, so that `unmount` can wait until it has let go of the images.
    public static let pidAttribute = RootAttribute.pid

    /// The file the image is served from now (the target's after a pivot), so that
    /// `mirrorfs list` shows it.
    public static let servingAttribute = RootAttribute.serving
    /// The target of the job that runs, if any: a start that finds it locked names the mount.
    public static let targetAttribute = RootAttribute.target

    /// The root's extended attributes.
    var rootAttributes: [String: String] {
        var attributes = [Self.pidAttribute: String(getpid()), Self.servingAttribute: filter.device.location,
                          RootAttribute.restarts: String(restarts)]
        if let keeper { attributes[RootAttribute.keeper] = String(keeper) }
        if let controlSocket { attributes[Self.controlSocketAttribute] = controlSocket }
        if let job = filter.job { attributes[Self.targetAttribute] = job.target.location }
        return attributes
    }
    /// Whether O_DIRECT opens of the image get O_DIRECT on the source (QEMU's
    /// cache.direct=on) or are served through the source's page cache.
    let passDirect: Bool
    /// Called once the kernel's INIT has been answered for: the mount is usable.
    let onReady: @Sendable () -> Void
    /// How many servers this mount had before this one, and the process that holds its
    /// connection across them (nil when this server holds it alone).
    let restarts: Int
    let keeper: pid_t?

    /// Each open of a status file reads one snapshot, taken at open: every open sees the
    /// state of that moment, and reads within one open are consistent (procfs style).
    private let statusSnapshots = Mutex<StatusSnapshots>(StatusSnapshots())
    /// Status-file handles: this bit, this server's tag, a counter. A handle some earlier
    /// server made (the kernel keeps it across a takeover) is unknown here: its next read
    /// takes a fresh snapshot under it.
    static let statusHandleBit: UInt64 = 1 << 63
    private struct StatusSnapshots {
        var next: UInt64 = 1
        let tag = UInt64(UInt32.random(in: 1...UInt32.max >> 1)) << 32
        var contents: [UInt64: [UInt8]] = [:]
        /// Per status file: the size of its newest open snapshot. fstat after open reports
        /// that size, so a reader that trusts st_size reads the snapshot whole.
        var newestSize: [Node: (handle: UInt64, size: Int)] = [:]
    }
    /// Buffers for image reads: page aligned, so O_DIRECT reads need no bounce copy.
    let readBuffers: AlignedBufferPool

    public static let maxWrite = 1 << 20

    /// Where the mount is (the metrics' `mountpoint` label).
    let mountpoint: String

    public init(filter: MirrorFilter, imageName: String, mountpoint: String = "", uid: uid_t, gid: gid_t, permissions: mode_t,
                readBuffers: AlignedBufferPool, controlSocket: String?, passDirect: Bool = true,
                restarts: Int = 0, keeper: pid_t? = nil, onReady: @escaping @Sendable () -> Void) {
        self.restarts = restarts
        self.keeper = keeper
        self.mountpoint = mountpoint
        self.passDirect = passDirect
        self.controlSocket = controlSocket
        self.filter = filter
        self.imageName = imageName
        self.owner = (uid, gid)
        self.imagePermissions = filter.isReadOnly ? permissions & ~0o222 : permissions
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        self.mountTime = now
        self.readBuffers = readBuffers
        self.onReady = onReady
    }

    // MARK: - Tree

    func child(of parent: fuse_ino_t, named name: String) -> Node? {
        switch (Node(rawValue: parent), name) {
        case (.root, imageName): .image
        case (.root, Node.statusDirectoryName): .statusDirectory
        case (.statusDirectory, Node.jobJSONName): .jobJSON
        case (.statusDirectory, Node.eventsJSONLName): .eventsJSONL
        case (.statusDirectory, Node.metricsPromName): .metricsProm
        default: nil
        }
    }

    /// Directory entries of `node`, "." and ".." first.
    func entries(of node: Node) -> [(name: String, node: Node)]? {
        switch node {
        case .root: [(".", .root), ("..", .root), (imageName, .image), (Node.statusDirectoryName, .statusDirectory)]
        case .statusDirectory: [(".", .statusDirectory), ("..", .root), (Node.jobJSONName, .jobJSON), (Node.eventsJSONLName, .eventsJSONL),
                                (Node.metricsPromName, .metricsProm)]
        default: nil
        }
    }

    /// Attributes of `node`. The image's size and blocks come from its device on every
    /// call (attr timeout 0), so stat always shows the current allocation.
    func attributes(of node: Node) -> Result<stat, Errno> {
        var st = stat()
        st.st_ino = UInt(node.rawValue)
        st.st_uid = owner.uid
        st.st_gid = owner.gid
        st.st_atim = mountTime
        st.st_mtim = mountTime
        st.st_ctim = mountTime
        st.st_blksize = 4096
        switch node {
        case .root, .statusDirectory:
            st.st_mode = S_IFDIR | 0o555
            st.st_nlink = node == .root ? 3 : 2
        case .image:
            st.st_mode = S_IFREG | imagePermissions
            st.st_nlink = 1
            st.st_size = off_t(filter.size)
            switch Result(catching: { () throws(Errno) in try filter.allocatedBytes() }) {
            case .success(let bytes): st.st_blocks = blkcnt_t((bytes + 511) / 512)
            case .failure(let e): return .failure(e)
            }
        case .jobJSON, .eventsJSONL, .metricsProm:
            st.st_mode = S_IFREG | 0o444
            st.st_nlink = 1
            let open = statusSnapshots.withLock { $0.newestSize[node]?.size }
            st.st_size = off_t(open ?? statusContent(of: node).count)
        }
        return .success(st)
    }

    /// statfs(2) of the mount: the space of the file system that holds the image served,
    /// so `df` shows what writes into the image's holes can still use. Storage that
    /// cannot tell (an NBD export) shows zero blocks.
    func fileSystemStatistics() -> statvfs {
        if let st = filter.fileSystemStatistics() { return st }
        var st = statvfs()
        st.f_bsize = 4096
        st.f_frsize = 4096
        st.f_namemax = 255
        return st
    }

    // MARK: - Status files

    func statusContent(of node: Node) -> [UInt8] {
        switch node {
        case .jobJSON: Array(filter.jobJSON().utf8)
        case .eventsJSONL: Array(filter.events.text().utf8)
        case .metricsProm: Array(filter.metricsText(mountpoint: mountpoint, imageName: imageName).utf8)
        default: []
        }
    }

    func openStatusSnapshot(of node: Node) -> UInt64 {
        let content = statusContent(of: node)
        return statusSnapshots.withLock { state in
            let handle = Self.statusHandleBit | state.tag | (state.next & 0xffff_ffff)
            state.next += 1
            state.contents[handle] = content
            state.newestSize[node] = (handle, content.count)
            return handle
        }
    }

    /// The bytes of snapshot `handle` of `node` from `offset`, at most `size` of them. A
    /// handle opened under an earlier server gets a snapshot of now.
    func statusSnapshot(_ handle: UInt64, of node: Node, offset: Int, size: Int) -> [UInt8]? {
        guard handle & Self.statusHandleBit != 0 else { return nil }
        func slice(_ content: [UInt8]) -> [UInt8] {
            let start = min(max(offset, 0), content.count)
            return Array(content[start..<min(start + size, content.count)])
        }
        if let bytes = statusSnapshots.withLock({ $0.contents[handle].map(slice) }) { return bytes }
        // (Taken outside the lock: the content reads the job.)
        let fresh = statusContent(of: node)
        return statusSnapshots.withLock { state in
            if state.contents[handle] == nil { state.contents[handle] = fresh }
            return state.contents[handle].map(slice)
        }
    }

    func closeStatusSnapshot(_ handle: UInt64) {
        statusSnapshots.withLock { state in
            state.contents.removeValue(forKey: handle)
            for (node, newest) in state.newestSize where newest.handle == handle {
                state.newestSize.removeValue(forKey: node)
            }
        }
    }
}
