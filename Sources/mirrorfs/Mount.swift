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

        func run() throws {
            // A daemon child reports every failure, its own checks included, to the caller.
            let ready = readyFD.map(ReadyPipe.init(fd:))
            if ready != nil, let logFile { LogSink.shared.rotate(path: logFile, at: Int(clamping: logMaxSize.bytes)) }
            do {
                try checkAndServe(ready: ready)
            } catch {
                ready?.report(failure: "\(error)")
                throw error
            }
        }

        private func checkAndServe(ready: ReadyPipe?) throws {
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
            let mountDirectory = try MountpointCheck.validate(path: mountpoint)
            let socketPath = try qmp ?? ControlSocket.defaultPath(for: mountDirectory)
            try ControlSocket.validate(path: socketPath)
            // A daemonizing parent checks no further: the daemon does (it alone connects to
            // an NBD target, as many servers take one client only), and its errors come
            // back here as one line.
            if daemonize {
                try Daemon.spawnAndWait(arguments: CommandLine.arguments, mountpoint: mountDirectory, logFile: logFile)
                return
            }
            try serve(image: image, mountpoint: mountDirectory, mirrorOptions: mirrorOptions,
                      socketPath: socketPath, ready: ready)
        }

        private func serve(image: ImageSource, mountpoint: String, mirrorOptions: MirrorOptions?,
                           socketPath: String, ready: ReadyPipe?) throws {
            let pool = AlignedBufferPool(bufferSize: FUSEFileSystem.maxWrite)
            let device: FileBlockDevice
            do {
                device = try FileBlockDevice(path: image.path, readOnly: readOnly, bufferPool: pool)
                try device.lock()
            } catch let error as ImageLockError {
                throw CLIError("\(error.description): \(MountTable.holder(of: image.path))")
            } catch {
                throw CLIError("cannot open source '\(image.path)': \(error)")
            }
            let filter = MirrorFilter(source: device, readOnly: readOnly)
            let notify = SystemdNotify.shared
            filter.addEventListener { event in
                if let sentence = LogSentence.describe(event, mountpoint: mountpoint) { Log.info(sentence) }
                if case .statusChange = event.kind { notify.status(ServiceStatus.describe(filter, image: image.name)) }
            }
            filter.addDetachListener { detach in
                Log.info(LogSentence.describe(detach, mountpoint: mountpoint, image: image.name))
                notify.status(ServiceStatus.describe(filter, image: image.name))
            }
            let setup = JobSetup(imageName: image.name, mountpoint: mountpoint, bufferPool: pool, log: { Log.info($0) })
            let commands = QMPCommands(filter: filter, setup: setup,
                                       package: "mirrorfs \(Mirrorfs.configuration.version)",
                                       nbdTimeout: nbdTimeout, log: { Log.info($0) },
                                       onQuit: { kill(getpid(), SIGTERM) })
            // The socket before the job: a mount that cannot listen leaves no job behind.
            let server: QMPServer
            do {
                server = try QMPServer(path: socketPath, commands: commands)
            } catch {
                throw CLIError("\(error)")
            }
            defer { server.removeSocketFile() }
            filter.addEventListener { server.broadcast($0) }
            var createdTarget: String?
            if let target = job.target, let mirrorOptions {
                let request = JobRequest(target: target, mode: .createOrReuse, options: mirrorOptions,
                                         stateDirectory: .init(argument: job.stateDir), nbdTimeout: nbdTimeout)
                let existed = NBDBlockDevice.isURI(target) || access(target, F_OK) == 0
                do {
                    try setup.start(request, on: filter)
                } catch {
                    throw CLIError(error.description)
                }
                if !existed { createdTarget = target }
            }
            let fileSystem = FUSEFileSystem(
                filter: filter, imageName: image.name, mountpoint: mountpoint, uid: image.uid, gid: image.gid,
                permissions: image.permissions, readBuffers: pool, controlSocket: socketPath,
                passDirect: odirect == .passthrough,
                onReady: {
                    Log.info("serving \(image.path) as \(mountpoint)/\(image.name) (control socket \(socketPath))")
                    ready?.report(success: ())
                    notify.ready(status: ServiceStatus.describe(filter, image: image.name))
                })
            var options = MountOptions(fsName: image.path)
            options.readOnly = readOnly
            options.allowOther = allowOther
            let session: FUSESession
            do {
                session = try FUSESession(fileSystem: fileSystem, mountpoint: mountpoint, options: options)
            } catch {
                abandonJob(filter, createdTarget: createdTarget)
                throw error
            }
            let served = Result { try session.run() }
            notify.stopping()
            if case .failure = served, !session.didMount {
                // Not mounted: the job this command started goes, with what it created.
                abandonJob(filter, createdTarget: createdTarget)
                try served.get()
            }
            // A loop that ended with an error still ends the mount cleanly below.
            // No command may start or complete a job while the mount ends.
            server.stop()
            // Leave the images as durable as the unmount implies, and the log a record of it.
            filter.close()
            if let job = filter.job {
                Log.info(LeftBehind.describe(job.info().jsonValue))
            } else if let log = filter.failedJobLog {
                Log.info("the failed job's dirty log \(log.path) is kept: mounting with --target \(log.targetName) copies what it marks")
            }
            Log.info("unmounted \(mountpoint)")
            try served.get()
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
    static func validate(path: String) throws -> String {
        var st = stat()
        guard stat(path, &st) == 0 else {
            if errno == ENOTCONN { return try detachStaleMount(path) }
            throw CLIError("mountpoint '\(path)': \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            throw CLIError("mountpoint '\(path)' is not a directory")
        }
        // stat may be answered from the kernel's cache even when the daemon behind is gone.
        guard let directory = opendir(path) else {
            if errno == ENOTCONN { return try detachStaleMount(path) }
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
