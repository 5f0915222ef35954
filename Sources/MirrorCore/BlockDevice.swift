import Glibc
import SystemPackage

/// How a request wants the device's cache treated: `.direct` comes from a client that
/// opened the image O_DIRECT (QEMU's cache=none) and is passed through when the device can.
public enum CachePolicy: Sendable {
    case cached
    case direct
}

/// What the allocation of a byte range looks like, as SEEK_DATA/SEEK_HOLE report it.
public enum SeekTarget: Sendable {
    case data
    case hole
}

/// A fixed-size block device the mirror reads from or writes to. All methods may block
/// and are called from many threads at once; none is called on Swift's cooperative pool.
public protocol BlockDevice: AnyObject, Sendable {
    /// Size in bytes; fixed for the device's lifetime.
    var size: UInt64 { get }
    /// Reads up to `buffer.count` bytes at `offset`; returns fewer only at the end.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) -> Int
    /// Writes all of `buffer` at `offset`; the range lies inside the device.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno)
    /// Writes all of `buffer` at `offset` while `meanwhile` runs on the calling thread, when
    /// the device can take the write asynchronously; returns `meanwhile`'s result and the
    /// write's failure, if any. Nil, with `meanwhile` not run, when it cannot.
    func write<T>(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy,
                  alongside meanwhile: () -> T) -> (T, Errno?)?
    /// The descriptor an asynchronous (Linux AIO) write of the range may go to, from a
    /// buffer aligned to `AlignedBufferPool.alignment`; nil when the device cannot take one.
    func asynchronousWriteDescriptor(offset: UInt64, count: Int, cache: CachePolicy) -> CInt?
    /// Makes completed writes durable.
    func flush(dataOnly: Bool) throws(Errno)
    /// Deallocates the range; it reads back as zeroes afterwards.
    func punchHole(at offset: UInt64, length: UInt64) throws(Errno)
    /// Zeroes the range, leaving it allocated.
    func zeroRange(at offset: UInt64, length: UInt64) throws(Errno)
    /// Preallocates the range without changing its contents.
    func preallocate(at offset: UInt64, length: UInt64) throws(Errno)
    /// The first offset ≥ `offset` that starts `target`; ENXIO when there is none.
    func seek(_ target: SeekTarget, from offset: UInt64) throws(Errno) -> UInt64
    /// Bytes the device occupies on its storage (st_blocks × 512 for a file).
    func allocatedBytes() throws(Errno) -> UInt64
    /// What names the device's storage across restarts (a dirty log is bound to it).
    var identity: DeviceIdentity { get }
    /// The job resumes after an error: a device that lost its connection tries a new one
    /// at the next request instead of failing fast until its retry time.
    func retryNow()
    /// statvfs(3) of the file system that holds the device (statfs of the mount); nil
    /// when the storage cannot tell.
    func fileSystemStatistics() -> statvfs?
    /// When the storage last changed (a file's ctime); nil when it cannot tell (NBD).
    var changeStamp: ChangeStamp? { get }
    /// Where the device's data lives, as a person names it: a path or an NBD URI.
    var location: String { get }
}

extension BlockDevice {
    public func write<T>(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy,
                         alongside meanwhile: () -> T) -> (T, Errno?)? { nil }
    public func asynchronousWriteDescriptor(offset: UInt64, count: Int, cache: CachePolicy) -> CInt? { nil }
    public func retryNow() {}
    public var changeStamp: ChangeStamp? { nil }
    public func fileSystemStatistics() -> statvfs? { nil }
    public var location: String { "\(type(of: self))" }
}

/// FNV-1a, 64 bits: a hash of a name that stays the same across runs (Swift's Hasher is
/// seeded per process), for file names and identities derived from a path or URI.
public func stableHash(_ text: String) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in text.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
    return hash
}

/// A file's device and inode; for storage without them, a marker device and a hash.
public struct DeviceIdentity: Equatable, Sendable {
    public var device: UInt64
    public var inode: UInt64
    /// The device number of NBD exports, whose "inode" is a hash of the URI.
    public static let nbdDevice: UInt64 = 0x6e62_6400_0000_0000

    public init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }
}
