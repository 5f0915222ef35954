import CLinux
import Foundation
import XCTest

/// A test host in its own network namespace, reached over a veth pair with a /30 from
/// 10.200.0.0/16 that exists only inside the namespaces this host creates. An unreachable
/// guard route is added first, so when the link is down, traffic to the host never leaves
/// through the default route. Cuts are made on the host's side. `tearDown` removes
/// everything; the test registers it as a teardown block, so it runs on failure too.
final class NBDTestHost {
    let namespace: String
    let rootDevice: String
    let hostDevice: String
    let subnet: String
    let rootAddress: String
    let address: String
    /// Read when each server is up: the pid files go with the test's scratch directory,
    /// which is gone by the time teardown blocks run.
    private var pids: [Int32] = []
    private let runDirectory: String

    init(runDirectory: String) throws {
        self.runDirectory = runDirectory
        // A /30 per test: namespaces of concurrent runs never share one.
        let index = (Int(getpid()) &* 7 &+ Int.random(in: 0..<1024)) % 16384
        namespace = "mfs\(getpid())x\(index)"
        rootDevice = "mfr\(index)"
        hostDevice = "mfh\(index)"
        let base = index * 4
        let prefix = "10.200.\(base / 256)."
        subnet = prefix + "\(base % 256)/30"
        rootAddress = prefix + "\(base % 256 + 1)"
        address = prefix + "\(base % 256 + 2)"
        try ip(["route", "add", "unreachable", subnet, "metric", "4242"])
        try ip(["netns", "add", namespace])
        try ip(["link", "add", rootDevice, "type", "veth", "peer", "name", hostDevice])
        try ip(["link", "set", hostDevice, "netns", namespace])
        try ip(["addr", "add", rootAddress + "/30", "dev", rootDevice])
        try ip(["link", "set", rootDevice, "up"])
        try ip(["-n", namespace, "addr", "add", address + "/30", "dev", hostDevice])
        try ip(["-n", namespace, "link", "set", hostDevice, "up"])
        try ip(["-n", namespace, "link", "set", "lo", "up"])
    }

    private func ip(_ arguments: [String]) throws {
        let result = try execute("ip", arguments)
        guard result.status == 0 else {
            throw NSError(domain: "test", code: 1, userInfo: [NSLocalizedDescriptionKey: "ip \(arguments.joined(separator: " ")): \(result.stderr)"])
        }
    }

    /// Runs `command` inside the namespace (servers detach and write `pidFile`).
    func start(_ command: [String], pidFile: String, uri: String) throws -> String {
        try startDaemon("ip", ["netns", "exec", namespace] + command, log: pidFile + ".log")
        try waitForServer(uri)
        if let pid = readPid(pidFile) { pids.append(pid) }
        return uri
    }

    /// qemu-nbd serving `image` (raw) in the namespace; returns its URI.
    func qemuNBD(_ image: String, port: Int = 10809, extra: [String] = []) throws -> String {
        let pidFile = runDirectory + "/qemu-nbd-\(port).pid"
        return try start(["qemu-nbd", "--fork", "--pid-file=\(pidFile)", "-t", "-e", "32", "-f", "raw", "--cache=writeback",
                   "-b", address, "-p", "\(port)"] + extra + [image], pidFile: pidFile, uri: "nbd://\(address):\(port)")
    }

    /// nbdkit in the namespace with `arguments` (filters, plugin, parameters); returns its URI.
    func nbdkit(_ arguments: [String], port: Int = 10810) throws -> String {
        let pidFile = runDirectory + "/nbdkit-\(port).pid"
        return try start(["nbdkit", "-P", pidFile, "-i", address, "-p", "\(port)"] + arguments, pidFile: pidFile,
                  uri: "nbd://\(address):\(port)")
    }

    /// Black-holes the server's port from the host's side (silent, like a WAN cut).
    func cut(port: Int) throws {
        try execute("ip", ["netns", "exec", namespace, "nft", "add", "table", "inet", "cut"])
        try execute("ip", ["netns", "exec", namespace, "nft", "add", "chain", "inet", "cut", "in",
                           "{ type filter hook input priority 0; policy accept; }"])
        let result = try execute("ip", ["netns", "exec", namespace, "nft", "add", "rule", "inet", "cut", "in",
                                        "tcp", "dport", "\(port)", "drop"])
        XCTAssertEqual(result.status, 0, result.stderr)
    }

    func restore() throws {
        try execute("ip", ["netns", "exec", namespace, "nft", "delete", "table", "inet", "cut"])
    }

    func tearDown() {
        for pid in pids { kill(pid, SIGKILL) }
        _ = try? execute("ip", ["netns", "del", namespace])
        _ = try? execute("ip", ["link", "del", rootDevice])
        _ = try? execute("ip", ["route", "del", "unreachable", subnet, "metric", "4242"])
    }
}

/// Waits until `uri` answers (nbdinfo is the probe: the host has no ping).
@discardableResult
func waitForServer(_ uri: String, timeout: TimeInterval = 10) throws -> String {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if (try? execute("nbdinfo", ["--size", uri], timeout: 5))?.status == 0 { return uri }
        usleep(100_000)
    }
    throw NSError(domain: "test", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(uri) did not come up"])
}

/// An NBD server on a unix socket in `directory`, killed by `stop`.
final class UnixNBDServer {
    let socket: String
    let uri: String
    private let pidFile: String
    /// Read once at start: a later server may reuse the pid file.
    private var pid: Int32 = 0

    /// `kind` "qemu-nbd" serves `arguments.last` (raw); "nbdkit" takes filters and plugin.
    init(_ kind: String, in directory: String, name: String, _ arguments: [String]) throws {
        socket = directory + "/\(name).sock"
        pidFile = directory + "/\(name).pid"
        unlink(socket)
        let command: [String] = kind == "qemu-nbd"
            ? ["--fork", "--pid-file=\(pidFile)", "-t", "-e", "32", "-f", "raw", "--cache=writeback", "-k", socket] + arguments
            : ["-P", pidFile, "-U", socket] + arguments
        try startDaemon(kind, command, log: pidFile + ".log")
        uri = "nbd+unix:///?socket=\(socket)"
        try waitForServer(uri)
        pid = readPid(pidFile) ?? 0
    }

    /// Sends `signal` to this server (SIGSTOP makes a hung one).
    func send(_ signal: Int32) {
        if pid > 0 { kill(pid, signal) }
    }

    func stop() {
        send(SIGKILL)
        pid = 0
        usleep(100_000)
    }

    deinit { stop() }
}

/// Starts a server that forks into the background and waits for its foreground part.
/// posix_spawn and waitpid, not Process: Process learns of the exit through descriptors
/// the detached daemon inherits, and would wait for as long as the daemon runs. The
/// child keeps only stdin (/dev/null) and stdout/stderr (`log`).
func startDaemon(_ executable: String, _ arguments: [String], log: String) throws {
    let pid = try spawn(try which(executable), arguments, output: log)
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    guard status == 0 else {
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        throw NSError(domain: "test", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(executable) \(arguments.joined(separator: " ")): \(text)"])
    }
}

/// The pid a server wrote to `file` (read once it answers: some write it after detaching).
func readPid(_ file: String) -> Int32? {
    let text = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
    return Int32(text.trimmingCharacters(in: .whitespacesAndNewlines))
}
