import CLinux
import Foundation
import XCTest

/// The built `mirrorfs` executable, beside the test bundle in the build folder.
let mirrorfsBinary: String = {
    if let override = ProcessInfo.processInfo.environment["MIRRORFS_BIN"] { return override }
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    return exe.deletingLastPathComponent().appendingPathComponent("mirrorfs").path
}()

struct CommandResult {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Runs a program to completion (killed after `timeout` seconds) and captures its output.
@discardableResult
func execute(_ executable: String, _ arguments: [String], timeout: TimeInterval = 120,
             environment: [String: String] = [:],
             file: StaticString = #filePath, line: UInt = #line) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable.hasPrefix("/") ? executable : try which(executable))
    process.arguments = arguments
    if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    try process.run()
    // Drain both pipes while the process runs so a chatty program never blocks.
    nonisolated(unsafe) var outData = Data(), errData = Data()
    let group = DispatchGroup()
    group.enter()
    DispatchQueue.global().async { outData = out.fileHandleForReading.readDataToEndOfFile(); group.leave() }
    group.enter()
    DispatchQueue.global().async { errData = err.fileHandleForReading.readDataToEndOfFile(); group.leave() }
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline { usleep(10_000) }
    if process.isRunning {
        process.terminate()
        XCTFail("\(executable) \(arguments.joined(separator: " ")) timed out", file: file, line: line)
    }
    process.waitUntilExit()
    group.wait()
    return CommandResult(status: process.terminationStatus,
                         stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData, as: UTF8.self))
}

func which(_ name: String) throws -> String {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let candidate = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    throw NSError(domain: "test", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(name) not found in PATH"])
}

/// Four fio writers (4 KiB random, O_DIRECT, psync) on `image` for `runtime` seconds at
/// most, over its first `size` (all of it when nil), running until terminated.
func startWriters(_ image: String, size: String? = nil, runtime: Int) throws -> Process {
    let fio = Process()
    fio.executableURL = URL(fileURLWithPath: try which("fio"))
    fio.arguments = ["--name=load", "--filename=\(image)", "--rw=randwrite", "--bs=4k", "--direct=1", "--numjobs=4",
                     "--time_based", "--runtime=\(runtime)", "--ioengine=psync", "--verify_state_save=0"]
        + (size.map { ["--size=\($0)"] } ?? [])
    fio.standardOutput = FileHandle.nullDevice
    try fio.run()
    return fio
}

/// Runs `run` and fails the test unless it exits 0; returns stdout.
@discardableResult
func check(_ executable: String, _ arguments: [String], timeout: TimeInterval = 300,
           file: StaticString = #filePath, line: UInt = #line) throws -> String {
    let result = try execute(executable, arguments, timeout: timeout, file: file, line: line)
    XCTAssertEqual(result.status, 0, "\(executable) \(arguments.joined(separator: " ")) failed:\n\(result.stdout)\n\(result.stderr)",
                   file: file, line: line)
    return result.stdout
}

/// A scratch directory removed at the end of the test.
final class Scratch {
    let path: String
    init() throws {
        let template = "/tmp/mirrorfs-test-XXXXXX"
        var bytes = Array(template.utf8CString)
        guard let made = mkdtemp(&bytes) else { throw POSIXError(.EIO) }
        path = String(cString: made)
    }
    /// Removes the directory whole: file systems a test mounted inside it (tmpfs, a
    /// mirrorfs mount) are detached first, and a removal that races with a process still
    /// finishing (a daemon's last log line, a server's socket) is tried again.
    deinit {
        let table = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        let inside = table.split(separator: "\n").compactMap { $0.split(separator: " ").dropFirst(4).first.map(String.init) }
            .filter { $0.hasPrefix(path + "/") }
        for mountpoint in inside.sorted(by: >) { umount2(mountpoint, Int32(MNT_DETACH)) }
        for _ in 0..<50 {
            try? FileManager.default.removeItem(atPath: path)
            if !FileManager.default.fileExists(atPath: path) { return }
            usleep(100_000)
        }
    }

    func file(_ name: String) -> String { path + "/" + name }

    /// A sparse file of `size` bytes, optionally with random data in the given (offset, length) pieces.
    @discardableResult
    func image(_ name: String, size: UInt64, randomPieces: [(UInt64, Int)] = []) throws -> String {
        let path = file(name)
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0, ftruncate(fd, off_t(size)) == 0 else { throw POSIXError(.EIO) }
        let random = open("/dev/urandom", O_RDONLY)
        defer { close(random) }
        var bytes = [UInt8](repeating: 0, count: randomPieces.map(\.1).max() ?? 0)
        for (offset, length) in randomPieces {
            guard read(random, &bytes, length) == length,
                  pwrite(fd, bytes, length, off_t(offset)) == length else { throw POSIXError(.EIO) }
        }
        close(fd)
        return path
    }

    func directory(_ name: String) throws -> String {
        try FileManager.default.createDirectory(atPath: file(name), withIntermediateDirectories: true)
        return file(name)
    }
}

func sha256(_ path: String) throws -> String {
    String(try check("sha256sum", [path]).prefix(64))
}

func isMounted(_ path: String) -> Bool {
    let table = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
    return table.split(separator: "\n").contains { $0.split(separator: " ").dropFirst(4).first.map(String.init) == path }
}

/// The children of `pid` (/proc's list, every thread's).
func childPIDs(of pid: pid_t) -> [pid_t] {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    return tasks.flatMap { task in
        ((try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/children", encoding: .utf8)) ?? "")
            .split(separator: " ").compactMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }
}

/// A `mirrorfs mount` running in the foreground as a child of the test, unmounted
/// (and waited for) at the end of the test.
final class Mount {
    let process = Process()
    let mountpoint: String
    let image: String
    let stderrPipe = Pipe()

    init(source: String, at mountpoint: String, extra: [String] = [], environment: [String: String] = [:],
         file: StaticString = #filePath, line: UInt = #line) throws {
        self.mountpoint = mountpoint
        self.image = mountpoint + "/" + URL(fileURLWithPath: source).lastPathComponent
        process.executableURL = URL(fileURLWithPath: mirrorfsBinary)
        process.arguments = ["mount", source, mountpoint] + extra
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        process.standardError = stderrPipe
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(10)
        while !(isMounted(mountpoint) && FileManager.default.fileExists(atPath: image)) {
            guard process.isRunning, Date() < deadline else {
                process.terminate()
                process.waitUntilExit()
                let output = String(decoding: stderrPipe.fileHandleForReading.availableData, as: UTF8.self)
                throw NSError(domain: "test", code: 1, userInfo: [NSLocalizedDescriptionKey: "mount did not come up: \(output)"])
            }
            usleep(20_000)
        }
    }

    /// The serving daemon: the child of the keeper this command became.
    var serverPID: pid_t {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if let pid = childPIDs(of: process.processIdentifier).first { return pid }
            usleep(10_000)
        }
        return process.processIdentifier
    }

    /// Sends `signal` and waits for the daemon to exit; returns its exit status. SIGKILL
    /// kills the keeper and then its server: the whole daemon dies, as in a host's OOM or
    /// a service manager's kill, and the mount is left stale.
    @discardableResult
    func stop(signal: Int32 = SIGTERM) -> Int32 {
        guard process.isRunning else { return waitForExit() }
        let server = signal == SIGKILL ? childPIDs(of: process.processIdentifier) : []
        kill(process.processIdentifier, signal)
        for pid in server { kill(pid, SIGKILL) }
        return waitForExit()
    }

    func waitForExit(timeout: TimeInterval = 20) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            // What each thread of the daemon waits in, and what it logged: the test log
            // says why it did not end.
            print("the daemon of \(mountpoint) did not exit within \(Int(timeout)) s:\n" + threadStates())
            print(loggedSoFar())
            process.interrupt()
            _ = try? execute("/usr/bin/fusermount3", ["-u", "-z", mountpoint])
            process.waitUntilExit()
            return -1
        }
        return process.terminationStatus
    }

    /// What the daemon wrote to its stderr so far, without waiting for more.
    func loggedSoFar() -> String {
        let fd = stderrPipe.fileHandleForReading.fileDescriptor
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &chunk, chunk.count)
            guard n > 0 else { break }
            bytes += chunk[..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Every thread of the keeper and its server: name, state and kernel wait channel.
    func threadStates() -> String {
        ([process.processIdentifier] + childPIDs(of: process.processIdentifier)).flatMap { pid in
            ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []).sorted().map { task in
                let dir = "/proc/\(pid)/task/\(task)/"
                let read = { (name: String) in
                    ((try? String(contentsOfFile: dir + name, encoding: .utf8)) ?? "?").trimmingCharacters(in: .whitespacesAndNewlines)
                }
                let state = read("status").split(separator: "\n").first { $0.hasPrefix("State:") } ?? "?"
                return "  \(pid)/\(task) \(read("comm")) \(state) wchan=\(read("wchan")) \(read("syscall"))"
            }
        }.joined(separator: "\n")
    }

    deinit {
        if process.isRunning { stop() }
        if isMounted(mountpoint) { _ = try? execute("/usr/bin/fusermount3", ["-u", "-z", mountpoint]) }
    }
}

/// Runs one of the project's tools/ scripts against the built binary, in its own process
/// group (killed whole after `timeout` seconds); returns its exit status and combined output.
func runTool(_ relativePath: String, _ arguments: [String], timeout: TimeInterval = 1800,
             environment extra: [String: String] = [:],
             file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, output: String) {
    let log = try Scratch()
    let output = log.file("output")
    let path = projectRoot + "/" + relativePath
    var environment = ProcessInfo.processInfo.environment.merging(extra) { $1 }
    environment["MIRRORFS"] = mirrorfsBinary
    let pid = try spawn(path, arguments, output: output, environment: environment, ownGroup: true)
    let deadline = Date().addingTimeInterval(timeout)
    var status: Int32 = 0
    while true {
        let reaped = waitpid(pid, &status, WNOHANG)
        if reaped == pid || (reaped < 0 && errno != EINTR) { break }
        if Date() > deadline {
            kill(-pid, SIGKILL)
            XCTFail("\(relativePath) \(arguments.joined(separator: " ")) timed out", file: file, line: line)
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            break
        }
        usleep(20_000)
    }
    let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
    let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return (code, text)
}

/// Polls `.status/job.json` of a mount until it contains `fragment`; returns the last text.
@discardableResult
func waitForJob(_ mountpoint: String, containing fragment: String, timeout: TimeInterval = 30) -> String {
    let deadline = Date().addingTimeInterval(timeout)
    var text = ""
    repeat {
        text = (try? String(contentsOfFile: mountpoint + "/.status/job.json", encoding: .utf8)) ?? ""
        if text.contains(fragment) { break }
        usleep(50_000)
    } while Date() < deadline
    return text
}

/// Reading a mount's job state, shared by the mirror tests.
extension XCTestCase {
    /// Pivots the mount's job onto `target`, stops the daemon, and checks that `target`
    /// holds the source's bytes as of the pivot.
    func completeStopAndCompare(_ mount: Mount, source: String, target: String,
                                file: StaticString = #filePath, line: UInt = #line) throws {
        try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
        XCTAssertNil(job(mount), "a job after complete", file: file, line: line)
        XCTAssertEqual(mount.stop(), 0, file: file, line: line)
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
        XCTAssertEqual(compare.status, 0, "target equals the source as of the pivot: \(compare.stdout)\(compare.stderr)",
                       file: file, line: line)
    }

    /// `.status/job.json` parsed; nil while it holds `null`.
    func job(_ mount: Mount) -> [String: Any]? {
        guard let data = FileManager.default.contents(atPath: mount.mountpoint + "/.status/job.json") else { return nil }
        return (try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed])) as? [String: Any]
    }

    func events(_ mount: Mount) -> [String] {
        let text = (try? String(contentsOfFile: mount.mountpoint + "/.status/events.jsonl", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").map { line in
            let object = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any] ?? [:]
            let name = object["event"] as? String ?? "?"
            if name == "JOB_STATUS_CHANGE", let data = object["data"] as? [String: Any] { return "JSC \(data["status"] ?? "?")" }
            return name
        }
    }

    @discardableResult
    func waitUntil(_ what: String, timeout: TimeInterval = 60, file: StaticString = #filePath, line: UInt = #line,
                   _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition() { return true }
            usleep(20_000)
        }
        XCTFail("timed out waiting for \(what)", file: file, line: line)
        return false
    }

    func allocatedBytes(_ path: String) throws -> Int64 { Int64(try fileStatus(path).st_blocks) * 512 }
}

/// The project's root (this file is Tests/MirrorFUSETests/TestSupport.swift).
let projectRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent().path

/// The Python of the virtual environment `tools/setup` creates, which has the test-only
/// packages (qemu.qmp): a stock host's python3 refuses a global `pip install`.
let testPython: String = {
    if let override = ProcessInfo.processInfo.environment["MIRRORFS_TEST_PYTHON"] { return override }
    return projectRoot + "/.venv/bin/python3"
}()

/// posix_spawn of `path` with stdin /dev/null and stdout+stderr into the file `output`, no
/// other descriptor of the test's (a daemon it leaves running holds no pipe of ours);
/// optionally in a process group of its own, so it can be killed whole.
func spawn(_ path: String, _ arguments: [String], output: String, environment: [String: String]? = nil,
           ownGroup: Bool = false) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    _ = clinux_spawn_addclosefrom(&actions, 3)
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    if ownGroup {
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
    }
    let argv = ([path] + arguments).map { strdup($0) } + [nil]
    let envp = environment.map { $0.map { strdup("\($0.key)=\($0.value)") } + [nil] }
    defer { (argv + (envp ?? [])).forEach { free($0) } }
    var pid: pid_t = 0
    let spawned = envp.map { envp in posix_spawn(&pid, path, &actions, &attributes, argv, envp) }
        ?? posix_spawn(&pid, path, &actions, &attributes, argv, environ)
    guard spawned == 0 else { throw POSIXError(POSIXErrorCode(rawValue: spawned) ?? .EIO) }
    return pid
}
