import CNBD
import MirrorCore
import SystemPackage

/// An NBD export as a mirror target (and, after the pivot, as the image the mount serves),
/// reached through libnbd. Every request has a deadline of `timeout` seconds; what the
/// server cannot do natively (write-zeroes without punching) is emulated with writes.
public final class NBDBlockDevice: BlockDevice, @unchecked Sendable {
    public static let defaultTimeout: Double = 10
    /// The largest read or write sent as one request (servers accept at least 32 MiB).
    static let maxPayload = 32 << 20
    /// The largest write-zeroes or block-status range asked for at once: small enough that
    /// a server which writes zeroes out still answers well within the deadline.
    static let maxRange: UInt64 = 64 << 20

    public let uri: String
    public var location: String { uri }
    public let size: UInt64
    public let timeout: Double
    /// What the server offers, as negotiated on the first connection.
    public let canZero: Bool
    public let canFlush: Bool
    public let hasAllocationStatus: Bool
    private let connection: NBDConnection

    /// Whether `target` names an NBD export rather than a file.
    public static func isURI(_ target: String) -> Bool {
        target.hasPrefix("nbd://") || target.hasPrefix("nbd+unix://")
    }

    /// The URI forms mirrorfs accepts: nbd://HOST[:PORT][/EXPORT] and
    /// nbd+unix:///EXPORT?socket=PATH (no TLS); checked without connecting.
    public static func checkURI(_ uri: String) throws(NBDError) {
        if uri.hasPrefix("nbd+unix://") {
            guard uri.contains("socket=") else {
                throw NBDError("NBD URI '\(uri)' needs ?socket=PATH")
            }
        } else if uri.hasPrefix("nbd://") {
            let rest = uri.dropFirst("nbd://".count)
            guard let host = rest.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false).first,
                  !host.isEmpty else {
                throw NBDError("NBD URI '\(uri)' has no host")
            }
        } else {
            throw NBDError("'\(uri)' is not an NBD URI (nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH)")
        }
    }

    /// Connects to `uri` (within `timeout`) and checks that the export can be a target.
    public init(uri: String, timeout: Double = defaultTimeout) throws(NBDError) {
        try Self.checkURI(uri)
        let handle: OpaquePointer
        do {
            handle = try NBDHandle.connect(uri: uri, timeout: timeout)
        } catch {
            throw NBDError("cannot connect to '\(uri)': \(error.message)")
        }
        let size = nbd_get_size(handle)
        guard size >= 0 else {
            nbd_close(handle)
            throw NBDError("'\(uri)': \(NBDHandle.lastMessage())")
        }
        guard nbd_is_read_only(handle) == 0 else {
            nbd_close(handle)
            throw NBDError("NBD export '\(uri)' is read-only")
        }
        self.uri = uri
        self.size = UInt64(size)
        self.timeout = timeout
        self.canZero = nbd_can_zero(handle) == 1
        self.canFlush = nbd_can_flush(handle) == 1
        self.hasAllocationStatus = nbd_can_meta_context(handle, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1
        self.connection = NBDConnection(uri: uri, size: UInt64(size), timeout: timeout, handle: handle)
    }

    deinit { connection.shutdown() }

    public func retryNow() { connection.retryNow() }

    /// NBD exports have no inode: the URI names the storage (for the dirty log's identity).
    public var identity: DeviceIdentity {
        DeviceIdentity(device: DeviceIdentity.nbdDevice, inode: stableHash(uri))
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) -> Int {
        guard offset < size else { return 0 }
        let total = Int(min(UInt64(buffer.count), size - offset))
        var done = 0
        while done < total {
            let count = min(total - done, Self.maxPayload)
            try connection.perform(.read(buffer.baseAddress! + done, count: count, offset: offset + UInt64(done)))
            done += count
        }
        return total
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cache: CachePolicy) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let count = min(buffer.count - done, Self.maxPayload)
            try connection.perform(.write(buffer.baseAddress! + done, count: count, offset: offset + UInt64(done)))
            done += count
        }
    }

    public func flush(dataOnly: Bool) throws(Errno) {
        guard canFlush else { return }
        try connection.perform(.flush)
    }

    /// NBD_CMD_WRITE_ZEROES without NO_HOLE: the server may deallocate, so holes stay holes.
    /// (NBD_CMD_TRIM is not used: what a trimmed range reads back is unspecified.)
    public func punchHole(at offset: UInt64, length: UInt64) throws(Errno) {
        guard canZero else { throw .notSupported }
        try zero(at: offset, length: length, flags: 0)
    }

    public func zeroRange(at offset: UInt64, length: UInt64) throws(Errno) {
        if canZero {
            try zero(at: offset, length: length, flags: UInt32(LIBNBD_CMD_FLAG_NO_HOLE))
            return
        }
        let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { zeroes.deallocate() }
        zeroes.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let count = Int(min(length - done, UInt64(zeroes.count)))
            try write(UnsafeRawBufferPointer(rebasing: zeroes[0..<count]), at: offset + done, cache: .cached)
            done += UInt64(count)
        }
    }

    private func zero(at offset: UInt64, length: UInt64, flags: UInt32) throws(Errno) {
        var done: UInt64 = 0
        while done < length {
            let count = min(length - done, Self.maxRange)
            try connection.perform(.zero(count: count, offset: offset + done, flags: flags))
            done += count
        }
    }

    /// NBD has no allocate-without-writing.
    public func preallocate(at offset: UInt64, length: UInt64) throws(Errno) {
        throw .notSupported
    }

    /// From base:allocation block status when the server offers it; otherwise all data.
    public func seek(_ target: SeekTarget, from offset: UInt64) throws(Errno) -> UInt64 {
        guard offset < size else { throw .noSuchAddressOrDevice }
        guard hasAllocationStatus else {
            if target == .data { return offset }
            return size
        }
        var position = offset
        while position < size {
            let extents = try blockStatus(at: position, length: min(size - position, Self.maxRange))
            guard !extents.isEmpty else { break }
            for extent in extents {
                let isHole = extent.flags & UInt32(LIBNBD_STATE_HOLE) != 0
                if isHole == (target == .hole) { return position }
                position += extent.length
                if position >= size { break }
            }
        }
        if target == .data { throw .noSuchAddressOrDevice }
        return size
    }

    /// The export's size: NBD reports allocation per range, not in total.
    public func allocatedBytes() throws(Errno) -> UInt64 { size }

    private func blockStatus(at offset: UInt64, length: UInt64) throws(Errno) -> [ExtentList.Extent] {
        let list = ExtentList()
        let context = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: 2)
        defer { context.deallocate() }
        let sink: cnbd_extent_sink = { context, length, flags in
            Unmanaged<ExtentList>.fromOpaque(context!).takeUnretainedValue().extents.append(.init(length: length, flags: flags))
        }
        context[0] = unsafeBitCast(sink, to: UnsafeMutableRawPointer.self)
        context[1] = Unmanaged.passUnretained(list).toOpaque()
        try withExtendedLifetime(list) { () throws(Errno) in
            try connection.perform(.blockStatus(count: length, offset: offset, context: context))
        }
        return list.extents
    }
}

/// Collects a block-status reply; filled on the I/O thread while the caller waits.
final class ExtentList {
    struct Extent {
        let length: UInt64
        let flags: UInt32
    }
    var extents: [Extent] = []
}

/// An NBD target that cannot be used, with the reason in one line.
public struct NBDError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
