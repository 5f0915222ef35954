import ArgumentParser
import Foundation
import MirrorCore
import MirrorFUSE
import MirrorNBD
import MirrorQMP
import MirrorSetup
import SystemPackage

extension Mirrorfs {
    struct Mount: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Mount SOURCE's image at MOUNTPOINT.",
            discussion: """
                Stays in the foreground and logs to stderr; SIGINT or SIGTERM unmount cleanly. \
                With --daemonize it returns once the mount is usable and the daemon logs to \
                --log-file (default: /var/log/mirrorfs/ for root, else $XDG_RUNTIME_DIR/mirrorfs/ or \
                /tmp/mirrorfs-<uid>/, named after the mountpoint), rotated at --log-max-size. Under \
                systemd (NOTIFY_SOCKET set) it reports READY=1 once the mount and the control socket \
                answer, its job's state as STATUS=, and STOPPING=1 when it unmounts.
                """
        )

        @Argument(help: "The raw image to serve.") var source: String
        @Argument(help: "An empty directory to mount on.") var mountpoint: String
        @OptionGroup var job: JobOptions
        @Option(help: "The QMP control socket (default: $XDG_RUNTIME_DIR/mirrorfs/ or /tmp/mirrorfs-<uid>/, named after the mountpoint).")
        var qmp: String?
        @Option(help: "Seconds an NBD target may take to answer one request (or to connect) before it counts as failed.")
        var nbdTimeout: Double = NBDBlockDevice.defaultTimeout
        @Option(help: "How O_DIRECT opens of the image reach the source: passthrough (O_DIRECT there too, as QEMU's cache.direct=on) or cached (through the source's page cache).")
        var odirect: DirectPolicy = .passthrough
        @Flag(help: "Serve the image read-only.") var readOnly = false
        @Flag(help: "Let other users reach the mount (their access still follows the image's mode).")
        var allowOther = false
        @Flag(help: "Run in the background; return once the mount is usable.") var daemonize = false
        @Option(help: "The daemon's log with --daemonize (default: /var/log/mirrorfs/ for root, else the runtime directory, named after the mountpoint).")
        var logFile: String?
        @Option(help: "Size at which the daemon's log file is rotated (one older file is kept as <log>.1; default: 16M).", transform: ByteCount.parse)
        var logMaxSize: ByteCount = ByteCount(bytes: 16 << 20)
        /// Set by a daemonizing parent: the pipe on which this child reports readiness.
        @Option(help: .hidden) var readyFD: Int32?
        /// Set by the keeper: its channel, the connection to take over, and how many servers
        /// came before this one and why the last one ended.
        @Option(help: .hidden) var keeperFD: Int32?
        @Option(help: .hidden) var fuseFD: Int32?
        @Option(help: .hidden) var restarts: Int = 0
        @Option(help: .hidden) var restartCause: String?

        func run() throws {
            // A daemon child reports every failure, its own checks included, to the caller.
            let ready = readyFD.map(ReadyPipe.init(fd:))
            let keeper = keeperFD.map(KeeperChannel.init(fd:))
            if ready != nil || keeper != nil, let logFile { LogSink.shared.rotate(path: logFile, at: Int(clamping: logMaxSize.bytes)) }
            do {
                try checkAndServe(ready: ready, keeper: keeper)
            } catch {
                ready?.report(failure: "\(error)")
                keeper?.send("error \(error)")
                throw error
            }
        }

        private func checkAndServe(ready: ReadyPipe?, keeper: KeeperChannel?) throws {
            let image = try ImageSource.validate(path: source, readOnly: readOnly)
            if job.target == nil && job.hasJobSettings {
                throw CLIError("job options need --target")
            }
            if job.target != nil && readOnly {
                throw CLIError("--read-only cannot be mirrored: a mirror needs a writable source")
            }
            guard nbdTimeout > 0 && nbdTimeout <= 3600 else {
                throw CLIError("--nbd-timeout must be more than 0 and at most 3600 seconds")
            }
            let mirrorOptions = try job.target.map { _ in try job.mirrorOptions(defaultJobID: image.name) }
            if let target = job.target, NBDBlockDevice.isURI(target) {
                do { try NBDBlockDevice.checkURI(target) } catch { throw CLIError(error.description) }
            }
            // A server that takes a connection over must not touch the mount: it is the one
            // that would answer.
            let mountDirectory = fuseFD != nil ? try MountpointCheck.canonical(path: mountpoint)
                                               : try MountpointCheck.validate(path: mountpoint)
            let socketPath = try qmp ?? ControlSocket.defaultPath(for: mountDirectory)
            try ControlSocket.validate(path: socketPath)
            // A daemonizing parent checks no further: the daemon does (it alone connects to
            // an NBD target, as many servers take one client only), and its errors come
            // back here as one line.
            if daemonize {
                try Daemon.spawnAndWait(arguments: CommandLine.arguments, mountpoint: mountDirectory, logFile: logFile)
                return
            }
            // The mount is held by a keeper, so that a server may die or be replaced under it.
            let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
            if keeper == nil, let keeperPath = Keeper.locate(executable: executable) {
                try Keeper.exec(keeperPath, mountpoint: mountDirectory,
                                serverArguments: [executable] + CommandLine.arguments.dropFirst())
            }
            if keeper == nil {
                Log.info("\(Keeper.name) is not installed beside \(executable): the mount ends with this daemon")
            }
            try serve(image: image, mountpoint: mountDirectory, mirrorOptions: mirrorOptions,
                      socketPath: socketPath, ready: ready, keeper: keeper)
        }

        private func serve(image: ImageSource, mountpoint: String, mirrorOptions: MirrorOptions?,
                           socketPath: String, ready: ReadyPipe?, keeper: KeeperChannel?) throws {
            let session = ServerSession(socketPath: socketPath)
            // A takeover continues what the record says; a fresh mount starts a new record.
            let previous: SessionRecord? = fuseFD != nil ? try session.load() : nil
            if previous == nil { session.remove() }
            let pool = AlignedBufferPool(bufferSize: FUSEFileSystem.maxWrite)
            let device = try openServedDevice(image: image, serving: previous?.serving, pool: pool)
            let filter = MirrorFilter(source: device, readOnly: readOnly)
            for line in session.previousEvents(capacity: filter.events.capacity) { filter.events.append(line) }
            let notify = SystemdNotify.shared
            let setup = JobSetup(imageName: image.name, mountpoint: mountpoint, bufferPool: pool, log: { Log.info($0) })
            // What a later server needs, kept current: the job as it runs now, the device served.
            let sourcePath = image.path
            let persist: @Sendable () -> Void = {
                session.update { record in
                    let served = filter.device.location
                    record.serving = served == sourcePath ? nil : served
                    record.job = Self.resumable(filter: filter, setup: setup)
                }
            }
            filter.addEventListener { event in
                session.append(event: event.jsonLine)
                if let sentence = LogSentence.describe(event, mountpoint: mountpoint) { Log.info(sentence) }
                if case .statusChange = event.kind { notify.status(ServiceStatus.describe(filter, image: image.name)) }
                persist()
            }
            filter.addPivotListener { target in
                // The completion is recorded: from here on the image lives in the target.
                session.update { record in
                    record.serving = target.location
                    record.job = nil
                }
            }
            filter.addDetachListener { detach in
                Log.info(LogSentence.describe(detach, mountpoint: mountpoint, image: image.name))
                notify.status(ServiceStatus.describe(filter, image: image.name))
                persist()
            }
            let commands = QMPCommands(filter: filter, setup: setup,
                                       package: "mirrorfs \(Mirrorfs.configuration.version)",
                                       nbdTimeout: nbdTimeout, log: { Log.info($0) },
                                       onQuit: { kill(getpid(), SIGTERM) }, afterCommand: persist)
            // The socket before the job: a mount that cannot listen leaves no job behind.
            let server: QMPServer
            do {
                server = try QMPServer(path: socketPath, commands: commands)
            } catch {
                throw CLIError("\(error)")
            }
            filter.addEventListener { server.broadcast($0) }
            var createdTarget: String?
            if let previous {
                resumeJob(previous.job, setup: setup, filter: filter)
            } else if let target = job.target, let mirrorOptions {
                let request = JobRequest(target: target, mode: .createOrReuse, options: mirrorOptions,
                                         stateDirectory: .init(argument: job.stateDir), nbdTimeout: nbdTimeout)
                let existed = NBDBlockDevice.isURI(target) || access(target, F_OK) == 0
                do {
                    try setup.start(request, on: filter)
                } catch {
                    server.removeSocketFile()
                    throw CLIError(error.description)
                }
                if !existed { createdTarget = target }
            }
            persist()
            let keeperPID: pid_t? = keeper != nil ? getppid() : nil
            let restartCount = restarts
            let cause = restartCause ?? "a restart"
            // In the init callback: the connection is this server's now.
            let connectionReady: @Sendable () -> Void = {
                if previous != nil {
                    filter.emit(JobEvent(.serverRestart(restarts: restartCount, cause: cause, pid: getpid())))
                } else {
                    let request = FUSESession.initRequest
                    session.update { $0.initRequest = request }
                }
                // libfuse answers the INIT after this callback (a replay's answer is
                // dropped): the first server keeps it, a later one compares.
                Thread.detachNewThread {
                    let reply = FUSESession.initReply(waiting: 1)
                    guard let previous else { return session.update { $0.initReply = reply } }
                    if !previous.initReply.isEmpty && previous.initReply != reply {
                        Log.info("this server would negotiate other FUSE parameters than the kernel agreed with the first one; the kernel keeps the first")
                    }
                }
                if keeper != nil && !FUSESession.kernelResends {
                    Log.info("this kernel cannot resend FUSE requests (no FUSE_HAS_RESEND, Linux < 6.9): the mount ends with its server")
                    keeper?.send("no-resend")
                }
                // What the keeper removes if the mount ends with no server to do it.
                for file in [socketPath, session.path, session.eventsPath] { keeper?.send("file " + file) }
                keeper?.send("serving")
            }
            let fileSystem = FUSEFileSystem(
                filter: filter, imageName: image.name, mountpoint: mountpoint, uid: image.uid, gid: image.gid,
                permissions: image.permissions, readBuffers: pool, controlSocket: socketPath,
                passDirect: odirect == .passthrough, restarts: restarts, keeper: keeperPID,
                onReady: {
                    connectionReady()
                    if previous != nil {
                        Log.info("serving \(filter.device.location) as \(mountpoint)/\(image.name) again (control socket \(socketPath))")
                    } else {
                        Log.info("serving \(image.path) as \(mountpoint)/\(image.name) (control socket \(socketPath))")
                    }
                    ready?.report(success: ())
                    notify.ready(status: ServiceStatus.describe(filter, image: image.name), mainPID: keeperPID ?? getpid())
                })
            var options = MountOptions(fsName: image.path)
            options.readOnly = readOnly
            options.allowOther = allowOther
            let fuse: FUSESession
            do {
                let takeover = try previous.map { record throws in
                    guard let fd = fuseFD, !record.initRequest.isEmpty else {
                        throw CLIError("the server record \(session.path) holds no FUSE_INIT: this connection cannot be taken over")
                    }
                    return Takeover(fuseFD: fd, initRequest: record.initRequest)
                }
                fuse = try FUSESession(fileSystem: fileSystem, mountpoint: mountpoint, options: options, takeover: takeover)
            } catch {
                server.removeSocketFile()
                if previous == nil { session.remove() }
                abandonJob(filter, createdTarget: createdTarget)
                throw error
            }
            let served = Result { try fuse.run(connected: { fd in try keeper?.sendMounted(fd: fd) }) }
            let end = try? served.get()
            if end != .handOver { notify.stopping() }
            if case .failure = served, !fuse.didMount {
                // Not mounted: the job this command started goes, with what it created.
                server.removeSocketFile()
                if previous == nil { session.remove() }
                abandonJob(filter, createdTarget: createdTarget)
                _ = try served.get()
            }
            // A mount to end is detached before anything else, so no request waits on it.
            if end == .signalled { FUSESession.detach(mountpoint: mountpoint) }
            // A loop that ended with an error still ends the mount cleanly below.
            // No command may start or complete a job while the mount ends.
            server.stop()
            // Leave the images as durable as the unmount implies, and the log a record of it.
            filter.close()
            if end == .handOver {
                // The job's own bitmap, exact now that no request is served: the next server
                // copies only what this one had not (the log's regions are coarser).
                let unsynced = filter.job?.unsyncedRanges()
                session.update { record in
                    record.job = Self.resumable(filter: filter, setup: setup)
                    record.job?.options.handOverRanges = unsynced
                }
                Log.info("handed \(mountpoint) over to a new server")
                Log.drain()
                Foundation.exit(Keeper.handOverStatus)
            }
            server.removeSocketFile()
            session.remove()
            if let job = filter.job {
                Log.info(LeftBehind.describe(job.info().jsonValue))
            } else if let log = filter.failedJobLog {
                Log.info("the failed job's dirty log \(log.path) is kept: mounting with --target \(log.targetName) copies what it marks")
            }
            Log.info("unmounted \(mountpoint)")
            _ = try served.get()
        }

        /// SOURCE, or the device a pivot moved the image to (a server taking over).
        private func openServedDevice(image: ImageSource, serving: String?, pool: AlignedBufferPool) throws -> any BlockDevice {
            if let serving, NBDBlockDevice.isURI(serving) {
                do { return try NBDBlockDevice(uri: serving, timeout: nbdTimeout) } catch {
                    throw CLIError("cannot reach '\(serving)', which the image is served from: \(error)")
                }
            }
            let path = serving ?? image.path
            do {
                let device = try FileBlockDevice(path: path, readOnly: readOnly, bufferPool: pool)
                try device.lock()
                return device
            } catch let error as ImageLockError {
                throw CLIError("\(error.description): \(MountTable.holder(of: path))")
            } catch {
                throw CLIError("cannot open source '\(path)': \(error)")
            }
        }

        /// The running job as a request a new server starts again: the same target and
        /// options, its copy mode and speed as they are now; nil once it is ending.
        static func resumable(filter: MirrorFilter, setup: JobSetup) -> JobRequest? {
            guard let job = filter.job, var request = setup.startedRequest, request.options.jobID == job.id else { return nil }
            let info = job.info()
            guard ![.aborting, .concluded, .null, .undefined].contains(info.status) else { return nil }
            // A hand-over's bitmap is for the one server after it (written at the hand-over).
            request.options.handOverRanges = nil
            request.options.copyMode = info.copyMode
            request.options.speed = info.speed
            if !NBDBlockDevice.isURI(request.target) { request.mode = .existing }
            return request
        }

        /// A taking-over server starts the job again from its dirty log; one that cannot
        /// resume is logged, and the image is served without it (nothing acknowledged is lost:
        /// the source holds every write).
        private func resumeJob(_ request: JobRequest?, setup: JobSetup, filter: MirrorFilter) {
            guard let request else { return }
            do {
                try setup.start(request, on: filter)
            } catch {
                Log.info("job '\(request.options.jobID)' could not resume in the new server: \(error.description); the image is served without it")
            }
        }
    }
}

/// A job started for a mount that did not come up: force-cancelled (its log goes), and a
/// target the start created is removed.
private func abandonJob(_ filter: MirrorFilter, createdTarget: String?) {
    guard let job = filter.job else { return }
    // A log this start resumed stays for the next attempt; one it created goes with the job.
    if job.options.resumeFromLog { job.abandon() } else { try? job.cancel(force: true) }
    let deadline = Date().addingTimeInterval(10)
    while filter.job != nil && Date() < deadline { usleep(10_000) }
    if let createdTarget, filter.job == nil { unlink(createdTarget) }
}

enum DirectPolicy: String, ExpressibleByArgument, CaseIterable {
    case passthrough, cached
}

/// SOURCE, checked before anything is mounted (SPEC section 6).
struct ImageSource {
    let path: String
    let name: String
    let size: UInt64
    let device: dev_t
    let inode: ino_t
    let uid: uid_t
    let gid: gid_t
    let permissions: mode_t

    static func validate(path: String, readOnly: Bool) throws -> ImageSource {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw CLIError("source '\(path)': \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw CLIError("source '\(path)' is not a regular file")
        }
        if let mount = MountTable.mirrorfsMount(holdingDevice: UInt64(st.st_dev)) {
            throw CLIError("source '\(path)' lies on the mirrorfs mount '\(mount.mountpoint)': serve the image it shows directly")
        }
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else {
            let reason = String(cString: strerror(errno))
            if !readOnly, access(path, R_OK) == 0 {
                throw CLIError("source '\(path)' is not writable (\(reason)); use --read-only to serve it read-only")
            }
            throw CLIError("cannot read source '\(path)': \(reason)")
        }
        close(fd)
        let absolute = URL(fileURLWithPath: path).standardizedFileURL.path
        return ImageSource(path: absolute, name: URL(fileURLWithPath: path).lastPathComponent,
                           size: UInt64(st.st_size), device: st.st_dev, inode: st.st_ino, uid: st.st_uid, gid: st.st_gid, permissions: st.st_mode & 0o777)
    }
}

/// Where the QMP socket goes, checked before mounting.
enum ControlSocket {
    /// `<runtime dir>/<mountpoint as a name>.qmp`, or a hashed name when that would not
    /// fit in a unix socket address.
    static func defaultPath(for mountpoint: String) throws -> String {
        let directory = try RuntimeDirectory.path()
        let path = directory + "/" + RuntimeDirectory.name(for: mountpoint, suffix: ".qmp")
        if path.utf8.count < 100 { return path }
        return directory + "/" + String(stableHash(mountpoint), radix: 16) + ".qmp"
    }

    static func validate(path: String) throws {
        guard path.utf8.count < 108 else { throw CLIError("QMP socket path '\(path)' is too long for a unix socket") }
        var st = stat()
        if lstat(path, &st) == 0 && (st.st_mode & S_IFMT) != S_IFSOCK {
            throw CLIError("QMP socket path '\(path)' exists and is not a socket")
        }
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
        guard access(directory, W_OK) == 0 else {
            throw CLIError("QMP socket directory '\(directory)': \(String(cString: strerror(errno)))")
        }
    }
}

/// MOUNTPOINT must be an existing, empty directory; returns its canonical path.
enum MountpointCheck {
    /// The canonical path without looking at the mountpoint itself (a mount whose server
    /// died would hold the look until a new server answers it: this one).
    /// (No Foundation URL here: URL(fileURLWithPath:) stats the path.)
    static func canonical(path: String) throws -> String {
        var trimmed = Substring(path)
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        let slash = trimmed.lastIndex(of: "/")
        let parentPath = slash.map { $0 == trimmed.startIndex ? "/" : String(trimmed[..<$0]) } ?? "."
        let name = slash.map { String(trimmed[trimmed.index(after: $0)...]) } ?? String(trimmed)
        guard let parent = realpath(parentPath, nil) else {
            throw CLIError("mountpoint '\(path)': \(String(cString: strerror(errno)))")
        }
        defer { free(parent) }
        let base = String(cString: parent)
        return (base == "/" ? "" : base) + "/" + name
    }

    static func validate(path: String) throws -> String {
        var st = stat()
        guard stat(path, &st) == 0 else {
            if MountTable.daemonGone(errno) { return try detachStaleMount(path) }
            throw CLIError("mountpoint '\(path)': \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            throw CLIError("mountpoint '\(path)' is not a directory")
        }
        // stat may be answered from the kernel's cache even when the daemon behind is gone.
        guard let directory = opendir(path) else {
            if MountTable.daemonGone(errno) { return try detachStaleMount(path) }
            throw CLIError("mountpoint '\(path)' cannot be listed: \(String(cString: strerror(errno)))")
        }
        // A live mirrorfs mount (a stale one failed the listing above).
        if let resolved = realpath(path, nil) {
            let full = String(cString: resolved)
            free(resolved)
            if let mount = MountTable.mirrorfsMounts().first(where: { $0.mountpoint == full }) {
                closedir(directory)
                throw CLIError("mountpoint '\(path)' is already a mirrorfs mount (of \(mount.source)): 'mirrorfs status \(path)' shows it, 'mirrorfs unmount \(path)' ends it")
            }
        }
        var empty = true
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { empty = false; break }
        }
        closedir(directory)
        guard empty else { throw CLIError("mountpoint '\(path)' is not empty") }
        guard let resolved = realpath(path, nil) else {
            throw CLIError("mountpoint '\(path)': \(String(cString: strerror(errno)))")
        }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// A mirrorfs daemon that died left its mount behind ("Transport endpoint is not
    /// connected"): detach it so the same mount command can resume.
    private static func detachStaleMount(_ path: String) throws -> String {
        let url = URL(fileURLWithPath: path)
        guard let parent = realpath(url.deletingLastPathComponent().path, nil) else {
            throw CLIError("mountpoint '\(path)': \(String(cString: strerror(errno)))")
        }
        let full = String(cString: parent) + "/" + url.lastPathComponent
        free(parent)
        guard MountTable.isMirrorfsMount(full), umount2(full, Int32(MNT_DETACH)) == 0 else {
            throw CLIError("mountpoint '\(path)' is a stale FUSE mount (Transport endpoint is not connected); clear it with 'fusermount3 -u \(path)'")
        }
        // A note, not an error: stdout, so that a refusal that follows stays one stderr line.
        print("mirrorfs: detached the stale mount left on \(full)")
        return try validate(path: path)
    }
}
