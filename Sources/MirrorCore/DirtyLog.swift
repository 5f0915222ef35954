import Glibc
import SystemPackage

/// When a file last changed (its ctime, in nanoseconds); what a clean stop records to tell
/// whether anyone wrote an image while no server held it.
public struct ChangeStamp: Equatable, Sendable {
    public var nanoseconds: UInt64
    public init(nanoseconds: UInt64) { self.nanoseconds = nanoseconds }
}

/// A persistent record of which regions of the image may differ between source and target
/// (md's write-intent bitmap, dm-raid1's disk log): a region's bit is durable before any
/// write to it reaches the source, and is cleared only after the target has been flushed
/// with the region clean. After a crash, only logged regions are copied again.
///
/// The header also carries the job's persistent life cycle (`Record`), so a log outlives
/// the job that wrote it: what a restart may trust, and what it must refuse.
///
/// Layout: a 4 KiB header, then one bit per `regionSize` bytes of the image.
/// Regions are 64 MiB, as md's bitmap chunks on large arrays: the first write to a region
/// costs one log write and fdatasync (shared by concurrent writers), so small regions make
/// sequential writers pay it often (measured here: 0.57× the throughput of 1 MiB writes
/// with 16 MiB regions). With 64 MiB a sequential writer pays once per 64 MiB, random
/// writers mark every region within moments and then pay nothing, a 1 TiB image needs a
/// 2 KiB bitmap, and a crash resyncs at most 64 MiB per region written in the last ~10 s.
public final class DirtyLog: @unchecked Sendable {
    public static let magic: [UInt8] = Array("MIRRORFS-DIRTYLOG".utf8)
    public static let version: UInt32 = 2
    public static let headerSize = 4096
    public static let regionSize: UInt64 = 64 << 20
    /// Seconds between sweeps; a region is cleared after two whole intervals without writes.
    public static let sweepInterval: Double = 5

    /// What the log belongs to: a log found for another source or target is not used.
    public struct Identity: Equatable, Sendable {
        public var sourceSize: UInt64, sourceDevice: UInt64, sourceInode: UInt64
        public var targetSize: UInt64, targetDevice: UInt64, targetInode: UInt64
        public init(source: any BlockDevice, target: any BlockDevice) {
            sourceSize = source.size; sourceDevice = source.identity.device; sourceInode = source.identity.inode
            targetSize = target.size; targetDevice = target.identity.device; targetInode = target.identity.inode
        }
    }

    /// The job's persistent life cycle, one small state machine kept in the header:
    ///
    ///     create ──► mirroring ──clean unmount──► stopped ──remount──► mirroring
    ///                    │  ▲                       (a source or target changed since → full copy)
    ///                    │  └── crash: stays mirroring, the bits cover every difference
    ///                    ├──complete──► completed (the image lives in the target: the old
    ///                    │              mount command is refused)
    ///                    └──cancel──► (log removed)
    ///
    /// A failed job stays `mirroring`: its log keeps marking every write until discarded.
    public enum Record: Equatable, Sendable {
        case mirroring
        /// Cleanly unmounted; the bits hold as long as both images still carry these change stamps.
        case stopped(source: ChangeStamp, target: ChangeStamp)
        /// The job pivoted at `time` (seconds since the epoch): the target is the image now.
        case completed(time: UInt64)
    }

    /// Why an existing log was not resumed.
    public enum Rejection: Error, Equatable, CustomStringConvertible {
        case missing, truncated, badMagic, wrongVersion(UInt32), badChecksum, identityMismatch, untrusted, partialJob
        public var description: String {
            switch self {
            case .missing: "no log"
            case .truncated: "the log is truncated"
            case .badMagic: "the log has no valid header"
            case .wrongVersion(let v): "the log has version \(v), not \(DirtyLog.version)"
            case .badChecksum: "the log's header checksum does not match"
            case .identityMismatch: "the log belongs to another source or target"
            case .untrusted: "the image was written since it was mounted, so the log cannot vouch for the target"
            case .partialJob: "the log was kept by a sync-none job, which never copied the whole image"
            }
        }
    }

    public let path: String
    public let regionCount: Int
    /// The target as the job named it (path or URI), kept for messages.
    public let targetName: String
    /// What the header says now (guarded by `lock`).
    private var currentRecord: Record = .mirroring
    /// Set when a write to the log failed (guarded by `lock`).
    private var brokenReason: String?
    /// `mark` calls since the log was opened (guarded by `lock`).
    private var markCount = 0
    /// Whether the job that created the log copies the whole image (sync full): a log of a
    /// sync-none job never vouches for regions nobody wrote.
    public let coversWholeImage: Bool
    /// Where the log tells of its own failure (the daemon's log).
    private let report: @Sendable (String) -> Void
    /// What the log belongs to.
    public let identity: Identity
    private let fd: Int32
    private var header: [UInt8]
    private let lock = ConditionLock<Void>()
    // Guarded by `lock`:
    private var wanted: [UInt64]       // bits set in memory
    private var durable: [UInt64]      // bits known to be on disk
    private var dirtyPages = Set<Int>() // bitmap pages changed since written
    private var flushing = false
    private var touchedRecent: [UInt64]
    private var touchedOld: [UInt64]
    /// Writes between `mark` and `finished` per region: such a region is never cleared,
    /// however long the write takes.
    private var writesInFlight: [Int32]

    private var bitmapBytes: Int { wanted.count * 8 }

    /// Creates (or replaces) the log with `allDirty` regions set, durably, in `mirroring`.
    public static func create(path: String, identity: Identity, allDirty: Bool, targetName: String = "",
                              coversWholeImage: Bool = true,
                              report: @escaping @Sendable (String) -> Void = { _ in }) throws(Errno) -> DirtyLog {
        let fd = try system_open(path + ".new", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600).get()
        var jobID = [UInt8](repeating: 0, count: 16)
        for i in jobID.indices { jobID[i] = UInt8.random(in: 0...255) }
        let log = DirtyLog(path: path, fd: fd, identity: identity, generation: 1, jobID: jobID, allDirty: allDirty,
                           targetName: targetName, coversWholeImage: coversWholeImage, report: report)
        do {
            try log.writeWhole()
        } catch {
            unlink(path + ".new")
            throw error
        }
        guard rename(path + ".new", path) == 0 else { throw Errno(rawValue: errno) }
        syncDirectory(of: path)
        return log
    }

    /// Opens an existing log for `identity` without changing it: `record` tells what the
    /// last server left; `begin()` makes it the running job's log.
    public static func resume(path: String, identity: Identity,
                              report: @escaping @Sendable (String) -> Void = { _ in }) throws(Rejection) -> DirtyLog {
        guard case .success(let fd) = system_open(path, O_RDWR | O_CLOEXEC) else { throw .missing }
        var header = [UInt8](repeating: 0, count: headerSize)
        guard case .success(let n) = header.withUnsafeMutableBytes({ system_preadFully(fd, $0, at: 0) }), n == headerSize else {
            close(fd); throw .truncated
        }
        guard Array(header[0..<magic.count]) == magic else { close(fd); throw .badMagic }
        let version = header.load(UInt32.self, at: 24)
        guard version == Self.version else { close(fd); throw .wrongVersion(version) }
        guard header.load(UInt32.self, at: 28) == crc32(header, excluding: 28..<32) else { close(fd); throw .badChecksum }
        let stored = Identity(header: header)
        guard stored == identity else { close(fd); throw .identityMismatch }
        let generation = header.load(UInt64.self, at: 32)
        let jobID = Array(header[40..<56])
        guard let record = Record(header: header) else { close(fd); throw .badMagic }
        let nameLength = min(Int(header.load(UInt32.self, at: 160)), Self.maximumTargetName)
        let targetName = String(decoding: header[164..<164 + nameLength], as: UTF8.self)
        let log = DirtyLog(path: path, fd: fd, identity: identity, generation: generation + 1, jobID: jobID, allDirty: false,
                           targetName: targetName, coversWholeImage: header.load(UInt32.self, at: 2048) == 1, report: report)
        log.currentRecord = record
        var bitmap = [UInt8](repeating: 0, count: log.bitmapBytes)
        guard case .success(let got) = bitmap.withUnsafeMutableBytes({ system_preadFully(fd, $0, at: UInt64(headerSize)) }),
              got == bitmap.count else { close(fd); throw .truncated }
        bitmap.withUnsafeBytes { raw in
            for i in log.wanted.indices { log.wanted[i] = raw.load(fromByteOffset: i * 8, as: UInt64.self) }
        }
        log.durable = log.wanted
        return log
    }

    static let maximumTargetName = 1024

    private init(path: String, fd: Int32, identity: Identity, generation: UInt64, jobID: [UInt8], allDirty: Bool,
                 targetName: String, coversWholeImage: Bool, report: @escaping @Sendable (String) -> Void) {
        self.path = path
        self.coversWholeImage = coversWholeImage
        self.fd = fd
        self.identity = identity
        self.report = report
        self.targetName = String(decoding: Array(targetName.utf8).prefix(Self.maximumTargetName), as: UTF8.self)
        regionCount = Int((identity.sourceSize + Self.regionSize - 1) / Self.regionSize)
        let words = (regionCount + 63) / 64
        wanted = [UInt64](repeating: 0, count: words)
        if allDirty {
            for r in 0..<regionCount { wanted[r >> 6] |= 1 << UInt64(r & 63) }
        }
        durable = wanted
        touchedRecent = [UInt64](repeating: 0, count: words)
        touchedOld = touchedRecent
        writesInFlight = [Int32](repeating: 0, count: regionCount)
        header = [UInt8](repeating: 0, count: Self.headerSize)
        header.replaceSubrange(0..<Self.magic.count, with: Self.magic)
        header.store(Self.version, at: 24)
        header.store(generation, at: 32)
        header.replaceSubrange(40..<56, with: jobID)
        identity.store(into: &header)
        header.store(Self.regionSize, at: 112)
        header.store(UInt64(regionCount), at: 120)
        let name = Array(self.targetName.utf8)
        header.store(UInt32(name.count), at: 160)
        header.replaceSubrange(164..<164 + name.count, with: name)
        Record.mirroring.store(into: &header)
        header.store(UInt32(coversWholeImage ? 1 : 2), at: 2048)
        header.store(crc32(header, excluding: 28..<32), at: 28)
    }

    // MARK: - Life cycle

    public var record: Record { lock.withLock { currentRecord } }

    /// A server takes the log for its job: `mirroring`, generation bumped, durably.
    public func begin() throws(Errno) {
        try setRecord(.mirroring)
    }

    /// Writes `record` into the header durably (pwrite + fdatasync).
    public func setRecord(_ record: Record) throws(Errno) {
        try lock.withLock { () throws(Errno) in
            // A broken log is gone: it can record nothing (a completion then cannot be kept).
            guard brokenReason == nil else { throw Errno.ioError }
            var next = header
            record.store(into: &next)
            next.store(crc32(next, excluding: 28..<32), at: 28)
            do throws(Errno) {
                try write(header: next)
            } catch {
                // The old record goes back (best effort): a header that may have reached the
                // disk says no more than what the job still believes.
                try? write(header: header)
                throw error
            }
            header = next
            currentRecord = record
        }
    }

    deinit { close(fd) }

    // MARK: - Queries

    /// Byte ranges of the image whose regions are logged.
    public func loggedRanges(imageSize: UInt64) -> [(offset: UInt64, length: UInt64)] {
        lock.withLock {
            (0..<regionCount).filter { isSet(wanted, $0) }.map {
                let offset = UInt64($0) * Self.regionSize
                return (offset, min(Self.regionSize, imageSize - offset))
            }
        }
    }

    public var loggedRegions: Int { lock.withLock { (0..<regionCount).filter { isSet(wanted, $0) }.count } }

    // MARK: - Write path

    private func regions(_ offset: UInt64, _ length: UInt64) -> ClosedRange<Int> {
        Int(offset / Self.regionSize)...Int((offset + length - 1) / Self.regionSize)
    }

    /// Makes the bits of the regions under [offset, offset+length) durable, and counts a
    /// write in flight there until `finished`. Regions already durable cost nothing;
    /// concurrent callers share one write and one fdatasync.
    ///
    /// The image's user never fails because of the log: when the log cannot be written (a
    /// full or failing file system) it breaks — the file is removed, so no restart trusts
    /// it (a restart then copies everything), and marking costs nothing from then on.
    public func mark(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let regions = regions(offset, length)
        lock.withLock {
            markCount += 1
            for r in regions {
                set(&touchedRecent, r)
                writesInFlight[r] += 1
            }
            guard brokenReason == nil else { return }
            do throws(Errno) {
                try makeDurable(regions)
            } catch {
                breakLocked(error)
            }
        }
    }

    /// Why the log broke, if it did (then it is gone from disk and records nothing).
    public var broken: String? { lock.withLock { brokenReason } }

    /// Lock held.
    private func breakLocked(_ error: Errno) {
        guard brokenReason == nil else { return }
        var reason = "cannot write the dirty log \(path): \(error); it is removed, so a restart copies everything"
        if unlink(path) != 0 && errno != ENOENT {
            reason = "cannot write the dirty log \(path): \(error), nor remove it (\(String(cString: strerror(errno)))): remove it before a restart"
        }
        syncDirectory(of: path)
        brokenReason = reason
        lock.broadcast()
        report(reason)
    }

    /// The write `mark` announced has ended (successfully or not).
    public func finished(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        lock.withLock { for r in regions(offset, length) { writesInFlight[r] -= 1 } }
    }

    /// Lock held.
    private func makeDurable(_ regions: ClosedRange<Int>) throws(Errno) {
        if regions.allSatisfy({ isSet(durable, $0) }) { return }
        for r in regions where !isSet(wanted, r) {
            set(&wanted, r)
            dirtyPages.insert(r / 8 / 4096)
        }
        while !regions.allSatisfy({ isSet(durable, $0) }) {
            if flushing { lock.wait(); continue }
            try flushLocked()
        }
    }

    /// Writes the changed bitmap pages and fdatasyncs, with the lock released meanwhile.
    private func flushLocked() throws(Errno) {
        flushing = true
        let snapshot = wanted
        let pages = dirtyPages
        dirtyPages.removeAll()
        lock.unlock()
        var result: Result<Void, Errno> = .success(())
        snapshot.withUnsafeBytes { raw in
            for page in pages.sorted() {
                let start = page * 4096
                let end = min(start + 4096, raw.count)
                guard start < end else { continue }
                let slice = UnsafeRawBufferPointer(rebasing: raw[start..<end])
                if case .failure(let e) = system_pwriteFully(fd, slice, at: UInt64(Self.headerSize + start)) { result = .failure(e) }
            }
        }
        if case .success = result { result = system_sync(fd, dataOnly: true) }
        lock.lock()
        flushing = false
        if case .success = result {
            durable = snapshot
        } else {
            dirtyPages.formUnion(pages)
        }
        lock.broadcast()
        try result.get()
    }

    // MARK: - Clearing

    /// Regions untouched for two sweeps: candidates to clear once the target is flushed.
    /// Call periodically (every second or so).
    public func sweepCandidates() -> [Int] {
        lock.withLock {
            var candidates: [Int] = []
            for r in 0..<regionCount where isSet(wanted, r) && !isSet(touchedRecent, r) && !isSet(touchedOld, r)
                && writesInFlight[r] == 0 {
                candidates.append(r)
            }
            touchedOld = touchedRecent
            touchedRecent = [UInt64](repeating: 0, count: touchedRecent.count)
            return candidates
        }
    }

    /// Clears `regions` (the caller flushed the target after checking they are clean). The
    /// page is written without a sync: a bit that stays set on disk only costs a resync.
    public func clear(_ regions: [Int]) {
        lock.withLock {
            for r in regions where !isSet(touchedRecent, r) && writesInFlight[r] == 0 {
                unset(&wanted, r)
                unset(&durable, r)
                dirtyPages.insert(r / 8 / 4096)
            }
            guard !flushing, !dirtyPages.isEmpty else { return }
            let pages = dirtyPages
            dirtyPages.removeAll()
            wanted.withUnsafeBytes { raw in
                for page in pages {
                    let start = page * 4096, end = min(start + 4096, raw.count)
                    if start < end { _ = system_pwriteFully(fd, UnsafeRawBufferPointer(rebasing: raw[start..<end]), at: UInt64(Self.headerSize + start)) }
                }
            }
        }
    }

    /// The job was cancelled, or a new job replaces a failed one: the log no longer
    /// describes anything.
    public func retire() {
        unlink(path)
        syncDirectory(of: path)
    }

    /// The log cannot be kept true (a record that may or may not have reached the disk):
    /// it goes, as when a write to it fails.
    public func breakLog(_ error: Errno) {
        lock.withLock { breakLocked(error) }
    }

    /// Writes that marked this log since it was opened: a log that saw fewer writes than
    /// the mount served cannot vouch for the target.
    public var marks: Int { lock.withLock { markCount } }

    // MARK: - File

    private func writeWhole() throws(Errno) {
        try writeHeader()
        try wanted.withUnsafeBytes { raw in system_pwriteFully(fd, raw, at: UInt64(Self.headerSize)) }.get()
        try system_sync(fd, dataOnly: false).get()
    }

    private func writeHeader() throws(Errno) {
        try write(header: header)
    }

    private func write(header bytes: [UInt8]) throws(Errno) {
        try bytes.withUnsafeBytes { raw in system_pwriteFully(fd, raw, at: 0) }.get()
        try system_sync(fd, dataOnly: true).get()
    }

    private func isSet(_ words: [UInt64], _ r: Int) -> Bool { words[r >> 6] & (1 << UInt64(r & 63)) != 0 }
    private func set(_ words: inout [UInt64], _ r: Int) { words[r >> 6] |= 1 << UInt64(r & 63) }
    private func unset(_ words: inout [UInt64], _ r: Int) { words[r >> 6] &= ~(1 << UInt64(r & 63)) }
}

extension DirtyLog.Identity {
    init(header: [UInt8]) {
        sourceSize = header.load(UInt64.self, at: 64); sourceDevice = header.load(UInt64.self, at: 72)
        sourceInode = header.load(UInt64.self, at: 80); targetSize = header.load(UInt64.self, at: 88)
        targetDevice = header.load(UInt64.self, at: 96); targetInode = header.load(UInt64.self, at: 104)
    }

    func store(into header: inout [UInt8]) {
        header.store(sourceSize, at: 64); header.store(sourceDevice, at: 72); header.store(sourceInode, at: 80)
        header.store(targetSize, at: 88); header.store(targetDevice, at: 96); header.store(targetInode, at: 104)
    }
}

extension DirtyLog.Record {
    public var isStopped: Bool { if case .stopped = self { true } else { false } }

    init?(header: [UInt8]) {
        switch header.load(UInt32.self, at: 128) {
        case 1: self = .mirroring
        case 2: self = .stopped(source: ChangeStamp(nanoseconds: header.load(UInt64.self, at: 136)),
                                target: ChangeStamp(nanoseconds: header.load(UInt64.self, at: 144)))
        case 3: self = .completed(time: header.load(UInt64.self, at: 152))
        default: return nil
        }
    }

    func store(into header: inout [UInt8]) {
        switch self {
        case .mirroring:
            header.store(UInt32(1), at: 128)
        case let .stopped(source, target):
            header.store(UInt32(2), at: 128)
            header.store(source.nanoseconds, at: 136)
            header.store(target.nanoseconds, at: 144)
        case let .completed(time):
            header.store(UInt32(3), at: 128)
            header.store(time, at: 152)
        }
    }
}

extension Array where Element == UInt8 {
    func load<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    mutating func store<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }
}

/// fsync of the directory holding `path`: a rename or unlink there survives a power loss.
func syncDirectory(of path: String) {
    var directory = path
    if let slash = directory.lastIndex(of: "/") { directory = String(directory[..<slash]) } else { directory = "." }
    let fd = open(directory.isEmpty ? "/" : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { return }
    _ = fsync(fd)
    close(fd)
}

/// CRC-32 (IEEE) of `bytes`, with the bytes in `excluding` taken as zero.
func crc32(_ bytes: [UInt8], excluding: Range<Int>) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for (i, byte) in bytes.enumerated() {
        crc ^= UInt32(excluding.contains(i) ? 0 : byte)
        for _ in 0..<8 { crc = (crc >> 1) ^ (0xEDB8_8320 & (0 &- (crc & 1))) }
    }
    return ~crc
}
