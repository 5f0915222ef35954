import Foundation

/// The daemon's log: stderr, which `--daemonize` points at the log file. Lines go into a
/// bounded queue that one thread writes with write(2); a line that cannot be written (a
/// full disk, a reader that went away, a closed stderr) is dropped and counted, never
/// fatal, and a caller never waits for the disk (the job's events are logged from its
/// threads). SIGPIPE is ignored, so a vanished reader is an EPIPE like any other error.
enum Log {
    static func info(_ message: String) {
        let stamp = ISO8601DateFormatter().string(from: Date())
        LogSink.shared.enqueue("\(stamp) mirrorfs[\(getpid())]: \(message)\n")
    }

    /// Waits (briefly) until queued lines are written: before the process exits.
    static func drain() { LogSink.shared.drain(timeout: 1) }
}

final class LogSink: @unchecked Sendable {
    static let shared = LogSink(fd: STDERR_FILENO)
    /// Bytes queued before new lines are dropped.
    static let capacity = 1 << 20
    private let fd: Int32
    private let lock = NSCondition()
    // Guarded by `lock`:
    private var queue: [String] = []
    private var queuedBytes = 0
    private var writing = false
    private(set) var dropped = 0
    private var started = false
    /// The file stderr is, when it is rotated: at `limit` bytes it becomes `<path>.1`.
    private var rotation: (path: String, limit: Int)?
    /// Bytes the rotated file holds.
    private var fileSize = 0

    init(fd: Int32) {
        self.fd = fd
    }

    func enqueue(_ line: String) {
        lock.lock()
        defer { lock.unlock() }
        if !started {
            started = true
            signal(SIGPIPE, SIG_IGN)
            let thread = Thread { [self] in run() }
            thread.name = "log-writer"
            thread.start()
        }
        guard queuedBytes + line.utf8.count <= Self.capacity else {
            dropped += 1
            return
        }
        queue.append(line)
        queuedBytes += line.utf8.count
        lock.signal()
    }

    /// Rotates the log file stderr writes (a daemon's `--log-file`) at `limit` bytes,
    /// keeping one older file: the log never grows without bound.
    func rotate(path: String, at limit: Int) {
        lock.lock()
        defer { lock.unlock() }
        // Only a regular file that is the one stderr writes: never /dev/null, a pipe, or a
        // file another name now points to.
        guard let size = Self.sameRegularFile(fd, path) else { return }
        rotation = (path, max(limit, 4096))
        fileSize = size
    }

    /// The size of the file `fd` writes when `path` names that same regular file; else nil.
    private static func sameRegularFile(_ fd: Int32, _ path: String) -> Int? {
        var open = stat(), named = stat()
        guard fstat(fd, &open) == 0, stat(path, &named) == 0, (open.st_mode & S_IFMT) == S_IFREG,
              open.st_dev == named.st_dev, open.st_ino == named.st_ino else { return nil }
        return Int(open.st_size)
    }

    func drain(timeout: Double) {
        let deadline = Date().addingTimeInterval(timeout)
        lock.lock()
        defer { lock.unlock() }
        while (!queue.isEmpty || writing) && lock.wait(until: deadline) {}
    }

    private func run() {
        var lostBefore = 0
        while true {
            lock.lock()
            while queue.isEmpty { lock.wait() }
            var lines = queue
            queue.removeAll()
            queuedBytes = 0
            writing = true
            if dropped > lostBefore {
                lines.insert("mirrorfs[\(getpid())]: \(dropped - lostBefore) log lines were dropped\n", at: 0)
                lostBefore = dropped
            }
            let rotation = self.rotation
            var size = fileSize
            lock.unlock()
            var failed = 0
            for line in lines {
                if let rotation, size + line.utf8.count > rotation.limit, rotate(rotation.path) { size = 0 }
                if write(line) { size += line.utf8.count } else { failed += 1 }
            }
            lock.lock()
            fileSize = size
            dropped += failed
            lostBefore += failed
            writing = false
            lock.broadcast()
            lock.unlock()
        }
    }

    /// `path` becomes `path.1` (replacing the older one) and a new, empty `path` takes its
    /// place as stdout and stderr; false when that failed and the current file stays in use
    /// (a path that no longer names the file written is never renamed).
    private func rotate(_ path: String) -> Bool {
        guard Self.sameRegularFile(fd, path) != nil else { return false }
        let fresh = open(path + ".new", O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o600)
        guard fresh >= 0 else { return false }
        defer { close(fresh) }
        guard rename(path, path + ".1") == 0 else {
            unlink(path + ".new")
            return false
        }
        guard rename(path + ".new", path) == 0 else {
            rename(path + ".1", path)
            unlink(path + ".new")
            return false
        }
        if fd == STDERR_FILENO { dup2(fresh, STDOUT_FILENO) }
        return dup2(fresh, fd) >= 0
    }

    /// One write(2) of the whole line; false when it could not be written.
    private func write(_ line: String) -> Bool {
        var bytes = Array(line.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            bytes = bytes.dropFirst(n)
        }
        return true
    }
}

/// Writes one line to stderr without Foundation's FileHandle (which traps on EPIPE/ENOSPC).
func writeStandardError(_ text: String) {
    signal(SIGPIPE, SIG_IGN)
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let n = bytes.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return }
        bytes = bytes.dropFirst(n)
    }
}

/// Where a daemon keeps files that are not the user's: `$XDG_RUNTIME_DIR/mirrorfs`,
/// else `/tmp/mirrorfs-<uid>` (mode 0700).
enum RuntimeDirectory {
    static func path() throws -> String {
        let base: String
        if let xdg = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !xdg.isEmpty {
            base = xdg + "/mirrorfs"
        } else {
            base = "/tmp/mirrorfs-\(getuid())"
        }
        if mkdir(base, 0o700) != 0 && errno != EEXIST {
            throw CLIError("cannot create \(base): \(String(cString: strerror(errno)))")
        }
        return base
    }

    /// A file name for per-mount files: the mountpoint's path with '/' turned into '_'.
    static func name(for mountpoint: String, suffix: String) -> String {
        String(mountpoint.dropFirst().map { $0 == "/" ? "_" : $0 }) + suffix
    }
}
