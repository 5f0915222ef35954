import Foundation
import Glibc
import MirrorCore
import MirrorNBD
import SystemPackage

/// What a caller asks for when it starts a mirror: `mount --target`, `job start` and QMP
/// `drive-mirror` all translate into this, so every start path has the same checks, the
/// same dirty log and the same error texts.
public struct JobRequest: Sendable, Codable {
    /// How an existing or missing target file is treated.
    public enum TargetMode: Sendable, Codable {
        /// `mount --target`: create a missing target, reuse one of the source's size.
        case createOrReuse
        /// drive-mirror `absolute-paths`: create it; a path that exists is refused.
        case create
        /// drive-mirror `existing`: it must exist with the source's size.
        case existing
    }

    /// Where the job's dirty log lives.
    public enum StateDirectory: Sendable, Equatable, Codable {
        /// Next to a file target; next to the source for an NBD export.
        case automatic
        /// No log: the job is not crash-safe.
        case none
        case path(String)

        /// `--state-dir` / the QMP extension argument: a directory, or `none`.
        public init(argument: String?) {
            switch argument {
            case nil: self = .automatic
            case "none": self = .none
            case let path?: self = .path(path)
            }
        }
    }

    public var target: String
    public var mode: TargetMode
    public var options: MirrorOptions
    public var stateDirectory: StateDirectory
    public var nbdTimeout: Double

    public init(target: String, mode: TargetMode, options: MirrorOptions, stateDirectory: StateDirectory = .automatic,
                nbdTimeout: Double = NBDBlockDevice.defaultTimeout) {
        self.target = target
        self.mode = mode
        self.options = options
        self.stateDirectory = stateDirectory
        self.nbdTimeout = nbdTimeout
    }
}

/// The one path from a `JobRequest` to a running job on the mount's filter: the target is
/// checked (never the source itself, never on a mirrorfs mount or under the mountpoint,
/// the source's size, writable), created if asked, locked as QEMU locks images; the dirty
/// log is found, checked against its record, resumed or created. Nothing is created or
/// changed before every check has passed; a start that fails after creating the target
/// removes it again.
public struct JobSetup: Sendable {
    /// The image's file name in the mount (the default job id and QMP `device`).
    public let imageName: String
    /// The mount's directory: a target may not lie under it (also before it is mounted).
    public let mountpoint: String
    public let bufferPool: AlignedBufferPool
    /// The daemon's log (a dirty log that breaks says so there).
    public let log: @Sendable (String) -> Void
    /// One start at a time: two clients starting at once cannot both pass the checks.
    private let serial = ConditionLock<Void>()
    /// The request of the last job that started (a server that takes over starts it again).
    private let lastStarted = ConditionLock<JobRequest?>(nil)
    public var startedRequest: JobRequest? { lastStarted.withLock { $0 } }

    public init(imageName: String, mountpoint: String, bufferPool: AlignedBufferPool,
                log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.log = log
        self.imageName = imageName
        self.mountpoint = mountpoint
        self.bufferPool = bufferPool
    }

    /// Checks, opens and starts; the job runs on `filter` when this returns.
    @discardableResult
    public func start(_ request: JobRequest, on filter: MirrorFilter) throws(JobError) -> MirrorJob {
        try serial.withLock { () throws(JobError) in try startLocked(request, on: filter) }
    }

    private func startLocked(_ request: JobRequest, on filter: MirrorFilter) throws(JobError) -> MirrorJob {
        guard !filter.isReadOnly else { throw JobError("Block node is read-only") }
        if filter.job != nil {
            throw JobError("Node '\(imageName)' is busy: block device is in use by block job: mirror")
        }
        // The image served now is the job's source (the old target after a pivot).
        guard let source = filter.device as? FileBlockDevice else {
            throw JobError("the image is served from an NBD export now: mirroring it again is not supported")
        }
        let preparation = Preparation(setup: self, source: source, writesServed: filter.servedWrites,
                                      failedJobTargetStamp: filter.failedJobTargetStamp)
        let prepared = try preparation.prepare(request, adopting: filter.failedJobLog)
        do {
            let job = try filter.startMirror(to: prepared.target, options: prepared.options, log: prepared.log)
            lastStarted.withLock { $0 = request }
            log(prepared.summary)
            return job
        } catch {
            prepared.undo()
            throw error
        }
    }

    /// A checked target, its options and its log, ready for `MirrorFilter.startMirror`.
    struct Prepared {
        let target: any BlockDevice
        let options: MirrorOptions
        let log: DirtyLog?
        let createdPath: String?
        let summary: String

        func undo() {
            if let createdPath {
                unlink(createdPath)
                if let log { log.retire() }
            }
        }
    }

}

/// One start's checks and openings, against the image served now.
private struct Preparation {
    let setup: JobSetup
    let source: FileBlockDevice
    /// Writes the mount has served: a log read from disk vouches for a target only while
    /// this is 0; a failed job's log in memory only if it marked every one of them.
    let writesServed: Int
    /// The failed job's target when it was let go: adopting its log needs it unchanged.
    let failedJobTargetStamp: ChangeStamp?
    var imageName: String { setup.imageName }
    var mountpoint: String { setup.mountpoint }
    var bufferPool: AlignedBufferPool { setup.bufferPool }
    typealias Prepared = JobSetup.Prepared

    func prepare(_ request: JobRequest, adopting failedLog: DirtyLog?) throws(JobError) -> Prepared {
        var options = request.options
        options.targetName = request.target
        try options.validate()
        guard request.nbdTimeout > 0 && request.nbdTimeout <= 3600 else {
            throw JobError("the NBD timeout must be more than 0 and at most 3600 seconds")
        }
        let isNBD = NBDBlockDevice.isURI(request.target)
        // Links resolved: every spelling of one target finds the same log and record.
        let targetPath = isNBD ? request.target : resolvedPrefix(absolute(request.target))
        if !isNBD { options.targetName = targetPath }
        // The target: checked, opened (created last), locked.
        var created: String?
        let target: any BlockDevice
        let existed: Bool
        let logPath: String?
        if isNBD {
            logPath = try dirtyLogPath(request.stateDirectory, target: targetPath, isNBD: isNBD)
            target = try openNBD(request, uri: targetPath)
            existed = true
        } else {
            existed = try checkFile(targetPath, mode: request.mode)
            logPath = try dirtyLogPath(request.stateDirectory, target: targetPath, isNBD: isNBD)
            if !existed {
                try create(targetPath)
                created = targetPath
            }
            do {
                let device = try FileBlockDevice(path: targetPath, readOnly: false, bufferPool: bufferPool)
                try device.lock()
                target = device
            } catch let error as ImageLockError {
                if let created { unlink(created) }
                throw JobError("\(error.description): \(MountTable.holder(of: targetPath))")
            } catch {
                if let created { unlink(created) }
                throw JobError("Could not open '\(targetPath)': \(error)")
            }
        }
        guard target.size == source.size else {
            if let created { unlink(created) }
            throw JobError("target '\(targetPath)' has \(target.size) bytes but the source has \(source.size)")
        }
        options.targetIsZero = !existed

        // The dirty log.
        guard let logPath else {
            return Prepared(target: target, options: options, log: nil, createdPath: created,
                            summary: summary(options, log: nil))
        }
        let log: DirtyLog
        do {
            log = try openLog(at: logPath, target: target, existed: existed, adopting: failedLog, options: &options)
        } catch {
            if let created { unlink(created) }
            throw error
        }
        return Prepared(target: target, options: options, log: log, createdPath: created,
                        summary: summary(options, log: log))
    }

    private func summary(_ options: MirrorOptions, log: DirtyLog?) -> String {
        var text = "job '\(options.jobID)' mirrors \(source.path) to \(options.targetName ?? "?"): sync \(options.sync.rawValue), "
            + "copy-mode \(options.copyMode.rawValue), granularity \(options.granularity), buf-size \(options.bufSize), "
            + "speed \(options.speed), on-source-error \(options.onSourceError.rawValue), "
            + "on-target-error \(options.onTargetError.rawValue), dirty log \(log?.path ?? "none")"
        if let after = options.autoWriteBlockingAfter { text += ", auto-write-blocking after \(Int(after)) s without converging" }
        if let reason = options.resyncReason { text += "; \(reason)" }
        return text
    }

    private func absolute(_ path: String) -> String {
        URL(fileURLWithPath: path).standardizedFileURL.path
    }

    // MARK: - Target

    /// Whether the target file exists; throws for every target that must not be used.
    private func checkFile(_ path: String, mode: JobRequest.TargetMode) throws(JobError) -> Bool {
        try refuseInsideMounts(path)
        var st = stat()
        guard stat(path, &st) == 0 else {
            let reason = errno
            guard reason == ENOENT else { throw JobError("target '\(path)': \(String(cString: strerror(reason)))") }
            if mode == .existing { throw JobError("Could not open '\(path)': No such file or directory") }
            let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
            var dst = stat()
            guard stat(directory, &dst) == 0, (dst.st_mode & S_IFMT) == S_IFDIR else {
                throw JobError("target '\(path)' cannot be created: '\(directory)' is not a directory")
            }
            if let mount = MountTable.mirrorfsMount(holdingDevice: UInt64(dst.st_dev)) {
                throw JobError("target '\(path)' would lie on the mirrorfs mount '\(mount.mountpoint)'")
            }
            guard access(directory, W_OK) == 0 else {
                throw JobError("target '\(path)' cannot be created in '\(directory)': \(String(cString: strerror(errno)))")
            }
            return false
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw JobError("target '\(path)' is not a regular file") }
        if UInt64(st.st_dev) == source.device && UInt64(st.st_ino) == source.inode {
            throw JobError("target '\(path)' is the source image itself")
        }
        if let mount = MountTable.mirrorfsMount(holdingDevice: UInt64(st.st_dev)) {
            throw JobError("target '\(path)' lies on the mirrorfs mount '\(mount.mountpoint)'")
        }
        if mode == .create {
            throw JobError("target '\(path)' already exists (use mode 'existing' to mirror into it)")
        }
        guard UInt64(st.st_size) == source.size else {
            throw JobError("target '\(path)' has \(st.st_size) bytes but the source has \(source.size)")
        }
        guard access(path, W_OK) == 0 else {
            throw JobError("target '\(path)' is not writable: \(String(cString: strerror(errno)))")
        }
        return true
    }

    /// A target under the mountpoint would be served by this mount itself (or hidden by
    /// it); the path is compared as resolved as far as it exists, before any stat of it.
    private func refuseInsideMounts(_ path: String) throws(JobError) {
        let resolved = resolvedPrefix(path)
        for mount in [mountpoint] + MountTable.mirrorfsMounts().map(\.mountpoint) {
            if resolved == mount || resolved.hasPrefix(mount.hasSuffix("/") ? mount : mount + "/") {
                throw JobError("target '\(path)' lies under the mirrorfs mount '\(mount)'")
            }
        }
    }

    /// `path` with its longest existing ancestor resolved by realpath (links followed).
    private func resolvedPrefix(_ path: String) -> String {
        var head = path
        var tail: [String] = []
        while !head.isEmpty && head != "/" {
            if let real = realpath(head, nil) {
                defer { free(real) }
                return ([String(cString: real)] + tail.reversed()).joined(separator: "/")
                    .replacingOccurrences(of: "//", with: "/")
            }
            let url = URL(fileURLWithPath: head)
            tail.append(url.lastPathComponent)
            head = url.deletingLastPathComponent().path
        }
        return path
    }

    private func create(_ path: String) throws(JobError) {
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw JobError("Could not create '\(path)': \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(source.size)) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(path)
            throw JobError("Could not resize '\(path)': \(reason)")
        }
    }

    private func openNBD(_ request: JobRequest, uri: String) throws(JobError) -> NBDBlockDevice {
        // An export exists already; like QEMU, the nbd driver cannot create one.
        if request.mode == .create { throw JobError("Driver 'nbd' does not support image creation") }
        do {
            return try NBDBlockDevice(uri: uri, timeout: request.nbdTimeout)
        } catch {
            throw JobError(error.description)
        }
    }

    // MARK: - Dirty log

    /// Where the log of a mirror to `target` lives; nil without a log. By default next to
    /// a file target, and next to the source for an NBD export.
    private func dirtyLogPath(_ directory: JobRequest.StateDirectory, target: String, isNBD: Bool) throws(JobError) -> String? {
        let chosen: String
        switch directory {
        case .none: return nil
        case .path(let path): chosen = absolute(path)
        case .automatic: chosen = URL(fileURLWithPath: isNBD ? source.path : target).deletingLastPathComponent().path
        }
        try refuseInsideMounts(chosen + "/x")
        var st = stat()
        guard stat(chosen, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
            throw JobError("state directory '\(chosen)' is not a directory")
        }
        guard access(chosen, W_OK) == 0 else {
            throw JobError("state directory '\(chosen)' is not writable: \(String(cString: strerror(errno)))")
        }
        if isNBD {
            return chosen + "/" + imageName + ".nbd-" + String(stableHash(target), radix: 16) + ".dirtylog"
        }
        let name = URL(fileURLWithPath: target).lastPathComponent
        // A directory of its own may hold the logs of many targets of the same file name.
        if case .path = directory { return chosen + "/" + name + "-" + String(stableHash(target), radix: 16) + ".dirtylog" }
        return chosen + "/" + name + ".dirtylog"
    }

    /// Resumes the log when it can vouch for the target, refuses a migration that
    /// completed, and otherwise starts a log that copies everything an existing target
    /// may lack. `options` learns what to copy and why.
    private func openLog(at path: String, target: any BlockDevice, existed: Bool, adopting failedLog: DirtyLog?,
                         options: inout MirrorOptions) throws(JobError) -> DirtyLog {
        let identity = DirtyLog.Identity(source: source, target: target)
        // A hand-over's bitmap counts only beside the clean stop it was taken at (below).
        let handOver = options.handOverRanges
        options.handOverRanges = nil
        let name = options.targetName ?? ""
        let wholeImage = options.sync == .full
        if let failedLog, failedLog.path == path, existed, failedLog.identity == identity,
           failedLog.record == .mirroring, failedLog.broken == nil, failedLog.marks >= writesServed,
           failedLog.coversWholeImage || !wholeImage,
           let stamp = failedJobTargetStamp, target.changeStamp == stamp {
            // The failed job's log, still marked by every write since: its bits are current.
            return resumed(failedLog, reason: "resumed from the dirty log of the failed job", options: &options)
        }
        var reason = "the target existed without a dirty log: full copy"
        if existed {
            do {
                let log = try DirtyLog.resume(path: path, identity: identity, report: setup.log)
                if writesServed > 0, log.record == .mirroring || log.record.isStopped {
                    throw DirtyLog.Rejection.untrusted
                }
                if wholeImage && !log.coversWholeImage, log.record == .mirroring || log.record.isStopped {
                    throw DirtyLog.Rejection.partialJob
                }
                switch log.record {
                case .completed(let time):
                    throw JobError("the mirror to '\(name)' completed on \(Self.date(time)): the image now lives there; "
                                   + "mount '\(name)' instead (remove '\(path)' to mirror again)")
                case .mirroring:
                    try begin(log)
                    return resumed(log, reason: "resumed from the dirty log after the daemon stopped unexpectedly", options: &options)
                case let .stopped(sourceStamp, targetStamp):
                    if source.changeStamp != sourceStamp {
                        reason = "the source changed while it was not served: full copy"
                    } else if targetStamp.nanoseconds != 0, let now = target.changeStamp, now != targetStamp {
                        reason = "the target changed while it was not served: full copy"
                    } else if let pairs = handOver {
                        options.handOverRanges = pairs
                        try begin(log)
                        let bytes = stride(from: 1, to: pairs.count, by: 2).reduce(0) { $0 + pairs[$1] }
                        return resumed(log, reason: "resumed from the previous server's bitmap after a hand-over",
                                       bytes: bytes, options: &options)
                    } else {
                        try begin(log)
                        return resumed(log, reason: "resumed from the dirty log after a clean unmount", options: &options)
                    }
                }
            } catch let error as DirtyLog.Rejection {
                if error != .missing { reason = "dirty log '\(path)': \(error): full copy" }
            } catch let error as JobError {
                throw error
            } catch {
                throw JobError("dirty log '\(path)': \(error)")
            }
            options.resyncBytes = wholeImage ? source.size : 0
            options.resyncReason = wholeImage ? reason : nil
        }
        do {
            return try DirtyLog.create(path: path, identity: identity, allDirty: wholeImage,
                                       targetName: name, coversWholeImage: wholeImage, report: setup.log)
        } catch {
            throw JobError("cannot create dirty log '\(path)': \(error)")
        }
    }

    private func begin(_ log: DirtyLog) throws(JobError) {
        do { try log.begin() } catch { throw JobError("cannot write dirty log '\(log.path)': \(error)") }
    }

    /// `bytes`: what the resume copies (default: the regions the log marks).
    private func resumed(_ log: DirtyLog, reason: String, bytes: UInt64? = nil, options: inout MirrorOptions) -> DirtyLog {
        options.resumeFromLog = true
        options.resyncBytes = bytes ?? log.loggedRanges(imageSize: source.size).reduce(0) { $0 + $1.length }
        options.resyncReason = reason
        return log
    }

    private static func date(_ seconds: UInt64) -> String {
        let formatter = ISO8601DateFormatter()
        return formatter.string(from: Date(timeIntervalSince1970: Double(seconds)))
    }
}
