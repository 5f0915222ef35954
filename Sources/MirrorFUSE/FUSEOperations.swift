import CFuse
import CLinux
import Glibc
import MirrorCore
import SystemPackage

// The fuse_lowlevel_ops table. Every callback runs on a libfuse worker thread: it
// decodes its arguments, reaches the file system through fuse_req_userdata, calls one
// Swift method and sends exactly one reply. Nothing here is main-actor isolated.

/// Image handles: whether the client opened the image CLINUX_O_DIRECT, so its requests bypass
/// the source's page cache too.
enum ImageHandle {
    static let cached: UInt64 = 0
    static let direct: UInt64 = 1
    static func cachePolicy(_ fi: UnsafeMutablePointer<fuse_file_info>?) -> CachePolicy {
        fi?.pointee.fh == direct ? .direct : .cached
    }
}

private let entryTimeout = 1.0

@inline(__always)
private func fileSystem(_ req: fuse_req_t?) -> FUSEFileSystem {
    Unmanaged<FUSEFileSystem>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
}

@inline(__always)
private func replyError(_ req: fuse_req_t?, _ error: Errno) {
    fuse_reply_err(req, error.rawValue)
}

private func replyAttributes(_ req: fuse_req_t?, _ fs: FUSEFileSystem, _ node: Node) {
    switch fs.attributes(of: node) {
    case .failure(let e): replyError(req, e)
    case .success(var st):
        // The image and status files change under the kernel: never cache their attributes.
        let timeout = (node == .root || node == .statusDirectory) ? entryTimeout : 0
        fuse_reply_attr(req, &st, timeout)
    }
}

private func node(_ ino: fuse_ino_t) -> Node? { Node(rawValue: ino) }

/// getxattr/listxattr protocol: size 0 asks for the length; too small a buffer is ERANGE.
private func replyAttributeValue(_ req: fuse_req_t?, _ value: [UInt8], size: Int) {
    if size == 0 {
        fuse_reply_xattr(req, value.count)
    } else if size < value.count {
        replyError(req, Errno(rawValue: ERANGE))
    } else {
        _ = value.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), value.count) }
    }
}

/// Names the file system refuses to create, remove or rename: the tree is fixed.
private let refuseChange: Int32 = EPERM

func makeLowLevelOperations() -> fuse_lowlevel_ops {
    var ops = fuse_lowlevel_ops()

    ops.`init` = { userdata, conn in
        let fs = Unmanaged<FUSEFileSystem>.fromOpaque(userdata!).takeUnretainedValue()
        guard let conn else { return }
        // Requests up to 1 MiB; libfuse raises max_pages to match.
        conn.pointee.max_write = UInt32(FUSEFileSystem.maxWrite)
        conn.pointee.max_read = 0
        // Never cache image pages in the kernel: a write that returned was acknowledged
        // by the daemon (SPEC 7), and the status files change under the reader.
        conn.pointee.want &= ~UInt32(FUSE_CAP_WRITEBACK_CACHE)
        // O_TRUNC arrives with open, where it is refused, instead of as a separate truncate.
        if conn.pointee.capable & UInt32(FUSE_CAP_ATOMIC_O_TRUNC) != 0 {
            conn.pointee.want |= UInt32(FUSE_CAP_ATOMIC_O_TRUNC)
        }
        // Asynchronous CLINUX_O_DIRECT (QEMU aio, fio libaio) keeps several requests in flight.
        if conn.pointee.capable & UInt32(FUSE_CAP_ASYNC_DIO) != 0 {
            conn.pointee.want |= UInt32(FUSE_CAP_ASYNC_DIO)
        }
        conn.pointee.max_background = 64
        conn.pointee.congestion_threshold = 48
        // The session is initialised (libfuse set got_init before this callback): a
        // taking-over server has the kernel resend, then the other readers go on.
        SessionInitialisation.shared.run()
        fs.onReady()
    }

    ops.lookup = { req, parent, name in
        let fs = fileSystem(req)
        guard let name, let child = fs.child(of: parent, named: String(cString: name)) else {
            return replyError(req, .noSuchFileOrDirectory)
        }
        switch fs.attributes(of: child) {
        case .failure(let e): replyError(req, e)
        case .success(let st):
            var entry = fuse_entry_param()
            entry.ino = child.rawValue
            entry.generation = 1
            entry.attr = st
            entry.attr_timeout = (child == .root || child == .statusDirectory) ? entryTimeout : 0
            entry.entry_timeout = entryTimeout
            fuse_reply_entry(req, &entry)
        }
    }

    ops.getattr = { req, ino, _ in
        guard let n = node(ino) else { return replyError(req, .noSuchFileOrDirectory) }
        replyAttributes(req, fileSystem(req), n)
    }

    ops.setattr = { req, ino, attr, toSet, _ in
        let fs = fileSystem(req)
        guard let n = node(ino), let attr else { return replyError(req, .noSuchFileOrDirectory) }
        // The image keeps its size, mode and owner: truncate (and O_TRUNC), chmod and chown
        // are refused. A truncate to the current size changes nothing and succeeds;
        // timestamp updates are accepted and have no effect.
        if toSet & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID) != 0 {
            return replyError(req, .notPermitted)
        }
        if toSet & FUSE_SET_ATTR_SIZE != 0 {
            guard n == .image, UInt64(attr.pointee.st_size) == fs.filter.size else {
                return replyError(req, .notPermitted)
            }
        }
        replyAttributes(req, fs, n)
    }

    ops.open = { req, ino, fi in
        let fs = fileSystem(req)
        guard let n = node(ino), let fi else { return replyError(req, .noSuchFileOrDirectory) }
        let writing = (fi.pointee.flags & O_ACCMODE) != O_RDONLY
        switch n {
        case .root, .statusDirectory:
            replyError(req, .isDirectory)
        case .image:
            if writing && fs.filter.isReadOnly { return replyError(req, .readOnlyFileSystem) }
            // The image's size is fixed: O_TRUNC would discard it.
            if fi.pointee.flags & O_TRUNC != 0 { return replyError(req, .notPermitted) }
            let direct = fs.passDirect && fi.pointee.flags & CLINUX_O_DIRECT != 0
            let handle = direct ? ImageHandle.direct : ImageHandle.cached
            // direct_io: every read and write reaches the daemon (SPEC 7); parallel direct
            // writes: the kernel would otherwise serialise writes to the one inode.
            _ = cfuse_reply_open_flags(req, handle, UInt32(CFUSE_FOPEN_DIRECT_IO | CFUSE_FOPEN_PARALLEL_DIRECT_WRITES))
        case .jobJSON, .eventsJSONL, .metricsProm:
            if writing { return replyError(req, .permissionDenied) }
            // direct_io: the file changes size with its content; no stale page cache.
            _ = cfuse_reply_open_flags(req, fs.openStatusSnapshot(of: n), UInt32(CFUSE_FOPEN_DIRECT_IO))
        }
    }

    ops.release = { req, ino, fi in
        if let n = node(ino), n.isStatusFile, let fi {
            fileSystem(req).closeStatusSnapshot(fi.pointee.fh)
        }
        fuse_reply_err(req, 0)
    }

    ops.read = { req, ino, size, offset, fi in
        let fs = fileSystem(req)
        guard let n = node(ino), let fi else { return replyError(req, .noSuchFileOrDirectory) }
        switch n {
        case .image:
            let count = min(size, FUSEFileSystem.maxWrite)
            fs.readBuffers.withBuffer(count: count) { buffer in
                do throws(Errno) {
                    let got = try fs.filter.read(into: buffer, at: UInt64(offset), cache: ImageHandle.cachePolicy(fi))
                    fuse_reply_buf(req, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), got)
                } catch {
                    replyError(req, error)
                }
            }
        case .jobJSON, .eventsJSONL, .metricsProm:
            guard let bytes = fs.statusSnapshot(fi.pointee.fh, of: n, offset: Int(offset), size: size) else {
                return replyError(req, .badFileDescriptor)
            }
            _ = bytes.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        case .root, .statusDirectory:
            replyError(req, .isDirectory)
        }
    }

    ops.write = { req, ino, buf, size, offset, fi in
        let fs = fileSystem(req)
        guard node(ino) == .image, let buf else { return replyError(req, .permissionDenied) }
        do throws(Errno) {
            try fs.filter.write(UnsafeRawBufferPointer(start: buf, count: size), at: UInt64(offset),
                                cache: ImageHandle.cachePolicy(fi)) { fuse_reply_write(req, $0) }
        } catch {
            replyError(req, error)
        }
    }

    // close(2): data is already with the source (direct_io), nothing to do.
    ops.flush = { req, _, _ in _ = fuse_reply_err(req, 0) }

    ops.fsync = { req, ino, datasync, _ in
        let fs = fileSystem(req)
        guard node(ino) == .image else { _ = fuse_reply_err(req, 0); return }
        do throws(Errno) {
            try fs.filter.flush(dataOnly: datasync != 0)
            fuse_reply_err(req, 0)
        } catch {
            replyError(req, error)
        }
    }

    ops.fallocate = { req, ino, mode, offset, length, _ in
        let fs = fileSystem(req)
        guard node(ino) == .image else { return replyError(req, .permissionDenied) }
        guard offset >= 0, length > 0 else { return replyError(req, .invalidArgument) }
        let keepSize = mode & CLINUX_FALLOC_FL_KEEP_SIZE != 0
        let change: AllocationChange
        switch mode & ~CLINUX_FALLOC_FL_KEEP_SIZE {
        case CLINUX_FALLOC_FL_PUNCH_HOLE: change = .punchHole
        case CLINUX_FALLOC_FL_ZERO_RANGE: change = .zeroRange
        case 0: change = .preallocate
        default: return replyError(req, .notSupported)
        }
        do throws(Errno) {
            try fs.filter.changeAllocation(change, at: UInt64(offset), length: UInt64(length), keepSize: keepSize)
            fuse_reply_err(req, 0)
        } catch {
            replyError(req, error)
        }
    }

    ops.lseek = { req, ino, offset, whence, _ in
        let fs = fileSystem(req)
        guard node(ino) == .image else { return replyError(req, .invalidArgument) }
        let target: SeekTarget
        switch whence {
        case CLINUX_SEEK_DATA: target = .data
        case CLINUX_SEEK_HOLE: target = .hole
        default: return replyError(req, .invalidArgument)
        }
        guard offset >= 0 else { return replyError(req, .noSuchAddressOrDevice) }
        do throws(Errno) {
            fuse_reply_lseek(req, off_t(try fs.filter.seek(target, from: UInt64(offset))))
        } catch {
            replyError(req, error)
        }
    }

    ops.opendir = { req, ino, fi in
        guard let n = node(ino), n == .root || n == .statusDirectory else { return replyError(req, .notDirectory) }
        fuse_reply_open(req, fi)
    }

    ops.readdir = { req, ino, size, offset, _ in
        let fs = fileSystem(req)
        guard let n = node(ino), let entries = fs.entries(of: n) else { return replyError(req, .notDirectory) }
        var buffer = [CChar](repeating: 0, count: size)
        var used = 0
        var index = Int(offset)
        while index < entries.count {
            var st = stat()
            st.st_ino = UInt(entries[index].node.rawValue)
            st.st_mode = (entries[index].node == .root || entries[index].node == .statusDirectory) ? S_IFDIR : S_IFREG
            let needed = buffer.withUnsafeMutableBufferPointer { b in
                fuse_add_direntry(req, b.baseAddress! + used, size - used, entries[index].name, &st, off_t(index + 1))
            }
            if needed > size - used { break }
            used += needed
            index += 1
        }
        fuse_reply_buf(req, buffer, used)
    }

    ops.releasedir = { req, _, _ in _ = fuse_reply_err(req, 0) }

    ops.statfs = { req, _ in
        var st = fileSystem(req).fileSystemStatistics()
        fuse_reply_statfs(req, &st)
    }

    ops.getxattr = { req, ino, name, size in
        let fs = fileSystem(req)
        guard ino == Node.root.rawValue, let name, let value = fs.rootAttributes[String(cString: name)] else {
            return replyError(req, .noData)
        }
        replyAttributeValue(req, Array(value.utf8), size: size)
    }

    ops.listxattr = { req, ino, size in
        let fs = fileSystem(req)
        let names: [UInt8] = ino == Node.root.rawValue
            ? fs.rootAttributes.keys.sorted().flatMap { (name: String) -> [UInt8] in Array(name.utf8) + [0] } : []
        replyAttributeValue(req, names, size: size)
    }

    // The tree is fixed: nothing is created, removed or renamed.
    ops.mknod = { req, _, _, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.mkdir = { req, _, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.unlink = { req, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.rmdir = { req, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.symlink = { req, _, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.rename = { req, _, _, _, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.link = { req, _, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.create = { req, _, _, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.setxattr = { req, _, _, _, _, _ in _ = fuse_reply_err(req, refuseChange) }
    ops.removexattr = { req, _, _ in _ = fuse_reply_err(req, refuseChange) }

    return ops
}
