import SystemPackage

/// How a client asked to change a range's allocation (fallocate(2) modes the image supports).
public enum AllocationChange: Sendable, Equatable {
    /// PUNCH_HOLE|KEEP_SIZE: deallocate; reads return zeroes.
    case punchHole
    /// ZERO_RANGE: zeroes, allocated.
    case zeroRange
    /// Mode 0 or KEEP_SIZE: preallocate, contents unchanged.
    case preallocate
}

/// Every request on the image passes through here, as every request of a QEMU guest
/// passes through the mirror_top filter. It enforces the image's fixed size and
/// read-only flag, then forwards to the device the image is served from.
public final class MirrorFilter: Sendable {
    /// The device the image is served from.
    public let source: any BlockDevice
    public let isReadOnly: Bool
    public let events: EventLog

    public var size: UInt64 { source.size }

    public init(source: any BlockDevice, readOnly: Bool, events: EventLog = EventLog()) {
        self.source = source
        self.isReadOnly = readOnly || ((source as? FileBlockDevice)?.isReadOnly ?? false)
        self.events = events
    }

    /// Reads at `offset`; fewer bytes than asked only at the end of the image.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) -> Int {
        try source.read(into: buffer, at: offset, cache: cache)
    }

    /// Writes at `offset`, cut at the end of the image: returns the bytes written,
    /// ENOSPC when none fit (the image never grows).
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) -> Int {
        guard !isReadOnly else { throw .readOnlyFileSystem }
        guard !buffer.isEmpty else { return 0 }
        guard offset < size else { throw .noSpace }
        let count = Int(min(UInt64(buffer.count), size - offset))
        try source.write(UnsafeRawBufferPointer(rebasing: buffer[0..<count]), at: offset, cache: cache)
        return count
    }

    public func flush(dataOnly: Bool) throws(Errno) {
        guard !isReadOnly else { return }
        try source.flush(dataOnly: dataOnly)
    }

    /// Applies `change` to the range. A range past the end is cut for changes that keep
    /// the size; one that would grow the image is refused (EPERM: its size is fixed).
    public func changeAllocation(_ change: AllocationChange, at offset: UInt64, length: UInt64, keepSize: Bool) throws(Errno) {
        guard !isReadOnly else { throw .readOnlyFileSystem }
        let (end, overflow) = offset.addingReportingOverflow(length)
        if (overflow || end > size) && !keepSize { throw .notPermitted }
        guard offset < size, length > 0 else { return }
        let cut = min(overflow ? size : end, size) - offset
        switch change {
        case .punchHole: try source.punchHole(at: offset, length: cut)
        case .zeroRange: try source.zeroRange(at: offset, length: cut)
        case .preallocate: try source.preallocate(at: offset, length: cut)
        }
    }

    /// SEEK_DATA/SEEK_HOLE on the image. Past the end both fail with ENXIO, as lseek(2) does.
    public func seek(_ target: SeekTarget, from offset: UInt64) throws(Errno) -> UInt64 {
        guard offset < size else { throw .noSuchAddressOrDevice }
        return try source.seek(target, from: offset)
    }

    public func allocatedBytes() throws(Errno) -> UInt64 {
        try source.allocatedBytes()
    }

    /// `.status/job.json`: the job as QEMU's BlockJobInfo, `null` while there is none.
    public func jobJSON() -> String {
        "null\n"
    }
}
