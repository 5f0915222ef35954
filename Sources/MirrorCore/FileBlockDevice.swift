import CLinux
import Glibc
import SystemPackage

/// A regular file as a block device. It keeps two descriptors: a cached one, and an
/// CLINUX_O_DIRECT one (when the file system supports it) for requests from CLINUX_O_DIRECT clients,
/// so that QEMU's cache=none through the mount stays cache=none on the image.
public final class FileBlockDevice: BlockDevice {
    public let path: String
    public var location: String { path }
    public let size: UInt64
    public let isReadOnly: Bool
    /// Device and inode of the open file: the identity used to tell two paths apart.
    public let device: UInt64
    public let inode: UInt64
    public var identity: DeviceIdentity { DeviceIdentity(device: device, inode: inode) }
    private let cachedFD: CInt
    private let directFD: CInt?
    /// Offset and length alignment the CLINUX_O_DIRECT descriptor needs.
    private let directAlignment: Int
    private let bounce: AlignedBufferPool

    /// Opens `path`, which must be a regular file.
    public init(path: String, readOnly: Bool, bufferPool: AlignedBufferPool) throws(Errno) {
        let access = readOnly ? O_RDONLY : O_RDWR
        let fd = try system_open(path, access | O_CLOEXEC).get()
        let st: stat
        do {
            st = try system_fstat(fd).get()
        } catch {
            close(fd)
            throw error
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw Errno.invalidArgument
        }
        self.path = path
        self.isReadOnly = readOnly
        self.cachedFD = fd
        self.size = UInt64(st.st_size)
        self.device = UInt64(st.st_dev)
        self.inode = UInt64(st.st_ino)
        self.bounce = bufferPool
        // tmpfs before Linux 6.6 and some FUSE file systems refuse CLINUX_O_DIRECT: then every
        // request uses the cached descriptor.
        if case .success(let dfd) = system_open(path, access | O_CLOEXEC | CLINUX_O_DIRECT) {
            self.directFD = dfd
            self.directAlignment = Self.probeAlignment(dfd, size: UInt64(st.st_size), pool: bufferPool)
        } else {
            self.directFD = nil
            self.directAlignment = 0
        }
    }

    deinit {
        close(cachedFD)
        if let directFD { close(directFD) }
    }

    /// The smallest offset alignment (512 or 4096) an CLINUX_O_DIRECT read accepts.
    private static func probeAlignment(_ fd: CInt, size: UInt64, pool: AlignedBufferPool) -> Int {
        guard size >= 4096 else { return 4096 }
        let ok = pool.withBuffer(count: 512) { buf in
            if case .success = system_preadFully(fd, buf, at: 512) { return true }
            return false
        }
        return ok ? 512 : 4096
    }

    /// The descriptor for a request, CLINUX_O_DIRECT only when the range is aligned for it.
    private func directDescriptor(_ cache: CachePolicy, offset: UInt64, count: Int) -> CInt? {
        guard cache == .direct, let directFD, directAlignment > 0,
              offset % UInt64(directAlignment) == 0, count % directAlignment == 0,
              count <= bounce.bufferSize
        else { return nil }
        return directFD
    }

    private static func isAligned(_ pointer: UnsafeRawPointer?) -> Bool {
        Int(bitPattern: pointer) % AlignedBufferPool.alignment == 0
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) -> Int {
        guard offset < size else { return 0 }
        let count = Int(min(UInt64(buffer.count), size - offset))
        let target = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
        if let fd = directDescriptor(cache, offset: offset, count: count) {
            let n: Int
            if Self.isAligned(target.baseAddress) {
                n = try system_preadFully(fd, target, at: offset).get()
            } else {
                n = try bounce.withBuffer(count: count) { (aligned) throws(Errno) -> Int in
                    let n = try system_preadFully(fd, aligned, at: offset).get()
                    target.baseAddress!.copyMemory(from: aligned.baseAddress!, byteCount: n)
                    return n
                }
            }
            guard n < count else { return n }
            // A short direct read inside the file: finish through the cached descriptor.
            let rest = UnsafeMutableRawBufferPointer(rebasing: target[n...])
            return n + (try system_preadFully(cachedFD, rest, at: offset + UInt64(n)).get())
        }
        return try system_preadFully(cachedFD, target, at: offset).get()
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) {
        precondition(offset + UInt64(buffer.count) <= size, "write past the device's end")
        if let fd = directDescriptor(cache, offset: offset, count: buffer.count) {
            if Self.isAligned(buffer.baseAddress) {
                return try system_pwriteFully(fd, buffer, at: offset).get()
            }
            // The caller's buffer (libfuse's request buffer) is not aligned for CLINUX_O_DIRECT.
            return try bounce.withBuffer(count: buffer.count) { (aligned) throws(Errno) in
                aligned.baseAddress!.copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
                try system_pwriteFully(fd, UnsafeRawBufferPointer(aligned), at: offset).get()
            }
        }
        try system_pwriteFully(cachedFD, buffer, at: offset).get()
    }

    /// An O_DIRECT request goes through the thread's Linux AIO context: submitted, then
    /// `meanwhile` runs, then the completion is reaped. Anything else (a cached request, an
    /// unaligned range, no AIO context) is nil: the caller writes another way.
    public func write<T>(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy,
                         alongside meanwhile: () -> T) -> (T, Errno?)? {
        precondition(offset + UInt64(buffer.count) <= size, "write past the device's end")
        guard let fd = directDescriptor(cache, offset: offset, count: buffer.count), let aio = ThreadAIO.current else {
            return nil
        }
        func submit(_ aligned: UnsafeRawBufferPointer) -> (T, Errno?)? {
            guard let (result, written) = aio.write(fd, aligned, at: offset, meanwhile: meanwhile) else { return nil }
            switch written {
            case .failure(let errno): return (result, errno)
            case .success(0): return (result, .noSpace)
            case .success(let n) where n < aligned.count:
                // Short (the file system ran out of space part way): the rest the usual way.
                let rest = UnsafeRawBufferPointer(rebasing: aligned[n...])
                return (result, system_pwriteFully(cachedFD, rest, at: offset + UInt64(n)).failure)
            case .success: return (result, nil)
            }
        }
        if Self.isAligned(buffer.baseAddress) { return submit(buffer) }
        return bounce.withBuffer(count: buffer.count) { aligned in
            aligned.baseAddress!.copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
            return submit(UnsafeRawBufferPointer(aligned))
        }
    }

    /// The O_DIRECT descriptor, for an O_DIRECT request aligned for it.
    public func asynchronousWriteDescriptor(offset: UInt64, count: Int, cache: CachePolicy) -> CInt? {
        guard !isReadOnly, offset + UInt64(count) <= size else { return nil }
        return directDescriptor(cache, offset: offset, count: count)
    }

    /// Takes QEMU's image locks on the file for as long as the device lives (`ImageLock`).
    public func lock() throws(ImageLockError) {
        try ImageLock.acquire(fd: cachedFD, path: path, writable: !isReadOnly)
    }

    /// Releases the image locks (the file stays open).
    public func unlock() {
        ImageLock.release(fd: cachedFD)
    }

    public func flush(dataOnly: Bool) throws(Errno) {
        try system_sync(cachedFD, dataOnly: dataOnly).get()
    }

    public func punchHole(at offset: UInt64, length: UInt64) throws(Errno) {
        try system_fallocate(cachedFD, mode: CLINUX_FALLOC_FL_PUNCH_HOLE | CLINUX_FALLOC_FL_KEEP_SIZE, offset: offset, length: length).get()
    }

    public func zeroRange(at offset: UInt64, length: UInt64) throws(Errno) {
        try system_fallocate(cachedFD, mode: CLINUX_FALLOC_FL_ZERO_RANGE | CLINUX_FALLOC_FL_KEEP_SIZE, offset: offset, length: length).get()
    }

    public func preallocate(at offset: UInt64, length: UInt64) throws(Errno) {
        try system_fallocate(cachedFD, mode: CLINUX_FALLOC_FL_KEEP_SIZE, offset: offset, length: length).get()
    }

    public func seek(_ target: SeekTarget, from offset: UInt64) throws(Errno) -> UInt64 {
        try system_lseek(cachedFD, offset, whence: target == .data ? CLINUX_SEEK_DATA : CLINUX_SEEK_HOLE).get()
    }

    public func allocatedBytes() throws(Errno) -> UInt64 {
        UInt64(try system_fstat(cachedFD).get().st_blocks) * 512
    }

    public var changeStamp: ChangeStamp? {
        guard case .success(let st) = system_fstat(cachedFD) else { return nil }
        return ChangeStamp(nanoseconds: UInt64(st.st_ctim.tv_sec) * 1_000_000_000 + UInt64(st.st_ctim.tv_nsec))
    }

    public func fileSystemStatistics() -> statvfs? {
        try? system_fstatvfs(cachedFD).get()
    }
}
