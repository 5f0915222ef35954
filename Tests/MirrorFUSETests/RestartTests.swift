import CLinux
import Foundation
import XCTest

/// SPEC 11: the serving daemon may die or be replaced; the mount, its programs and its job
/// go on. Real mounts, real kill -9, real clients.
final class RestartTests: XCTestCase {
    /// 10 trials per copy mode of kill -9 under 4 verifying fio writers (tools/restart-test
    /// runs any number): fio ends without an error, every new server answers within 1 s,
    /// the target equals the source after complete.
    func testKillNineUnderVerifyingWritersIsAPause() throws {
        let trials = ProcessInfo.processInfo.environment["MIRRORFS_RESTART_TRIALS"] ?? "10"
        let (status, output) = try runTool("tools/restart-test", [trials, "both", "kill"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("restart-test: \(Int(trials)! * 2)/\(Int(trials)! * 2) trials passed"), output)
        print(output)
    }

    /// `mirrorfs restart` under the same load: no error, and fio's longest request within 1 s.
    func testPlannedRestartUnderLoadKeepsEveryRequestWithinOneSecond() throws {
        let (status, output) = try runTool("tools/restart-test", ["3", "both", "restart"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("restart-test: 6/6 trials passed"), output)
        print(output)
    }

    /// A server that cannot start again (its source is gone) ends the mount after five tries,
    /// with one line that names the cause.
    func testACrashLoopUnmountsWithOneLineNamingTheCause() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        let socket = try XCTUnwrap(rootAttribute(mount, "qmp"))
        try FileManager.default.moveItem(atPath: source, toPath: scratch.file("moved.raw"))
        kill(mount.serverPID, SIGKILL)
        XCTAssertEqual(mount.waitForExit(timeout: 30), 1)
        XCTAssertFalse(isMounted(mount.mountpoint))
        let stderr = String(decoding: mount.stderrPipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let last = stderr.split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertTrue(last.contains(" mirrorfs-keeper[\(mount.process.processIdentifier)]: the server failed to start 5 times in a row"), stderr)
        XCTAssertTrue(last.contains("No such file or directory") && last.contains("unmounted \(mount.mountpoint)"), last)
        XCTAssertEqual(stderr.components(separatedBy: "starting a new server").count - 1, 5, stderr)
        // Nothing of the dead servers stays beside the control socket.
        let base = String(socket.dropLast(".qmp".count))
        for file in [socket, base + ".session", base + ".events"] {
            XCTAssertFalse(FileManager.default.fileExists(atPath: file), file)
        }
    }

    /// After kill -9: the root names the new server and the restart, `status` and `list`
    /// show them, events.jsonl goes on with the restart event, and a status file opened
    /// under the dead server reads fresh content.
    func testTheMountShowsTheNewServerAndItsStatusFilesStayReadable() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 4 << 20)])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", target])
        waitForJob(mount.mountpoint, containing: #""ready": true"#)
        let status = open(mount.mountpoint + "/.status/job.json", O_RDONLY)
        XCTAssertGreaterThanOrEqual(status, 0)
        defer { close(status) }
        let first = mount.serverPID
        XCTAssertEqual(rootAttribute(mount, "pid"), String(first))
        XCTAssertEqual(rootAttribute(mount, "restarts"), "0")
        XCTAssertEqual(rootAttribute(mount, "keeper"), String(mount.process.processIdentifier))
        kill(first, SIGKILL)
        XCTAssertTrue(waitUntil("a new server") { rootAttribute(mount, "pid").map { $0 != String(first) } ?? false })
        XCTAssertEqual(rootAttribute(mount, "restarts"), "1")
        var buffer = [UInt8](repeating: 0, count: 65536)
        let got = pread(status, &buffer, buffer.count, 0)
        XCTAssertGreaterThan(got, 0, "a status file opened before the restart: \(String(cString: strerror(errno)))")
        let text = String(decoding: buffer.prefix(max(got, 0)), as: UTF8.self)
        XCTAssertTrue(text.contains(#""device": "disk.raw""#), text)
        XCTAssertTrue(events(mount).contains("__org.mirrorfs_SERVER_RESTART"), "\(events(mount))")
        let line = try check(mirrorfsBinary, ["status", mount.mountpoint])
        XCTAssertTrue(line.contains("server pid \(mount.serverPID), 1 restart"), line)
        let list = try check(mirrorfsBinary, ["list"])
        XCTAssertTrue(list.contains("RESTARTS"), list)
        let row = list.split(separator: "\n").first { $0.hasPrefix(mount.mountpoint + " ") } ?? ""
        XCTAssertTrue(row.contains(" \(mount.serverPID)  1 "), list)
        try completeStopAndCompare(mount, source: source, target: target)
    }

    /// A job started by QMP and switched to write-blocking comes back the same after kill -9
    /// (actively-synced again); after a pivot, a new server serves the target.
    func testAServerTakingOverResumesTheJobAsItWasAndKeepsAPivot() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 8 << 20), (40 << 20, 4 << 20)])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        try check(mirrorfsBinary, ["job", "start", mount.mountpoint, "--target", target])
        try check(mirrorfsBinary, ["job", "change", mount.mountpoint, "--copy-mode", "write-blocking"])
        waitForJob(mount.mountpoint, containing: #""actively-synced": true"#)
        kill(mount.serverPID, SIGKILL)
        let resumed = waitForJob(mount.mountpoint, containing: #""actively-synced": true"#)
        XCTAssertTrue(resumed.contains(#""copy-mode": "write-blocking""#), resumed)
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x33 1M 1M", mount.image])
        try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
        kill(mount.serverPID, SIGKILL)
        XCTAssertTrue(waitUntil("the new server to serve the target") { rootAttribute(mount, "serving") == target })
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x44 2M 1M", mount.image])
        XCTAssertEqual(mount.stop(), 0)
        let check1 = try execute("qemu-io", ["-f", "raw", "-c", "read -P 0x33 1M 1M", "-c", "read -P 0x44 2M 1M", target])
        XCTAssertFalse(check1.stdout.contains("Pattern verification failed"), check1.stdout)
        let old = try execute("qemu-io", ["-f", "raw", "-c", "read -P 0x44 2M 1M", source])
        XCTAssertTrue(old.stdout.contains("Pattern verification failed"), "the source is not written after the pivot")
    }

    /// A daemonized mount (its keeper once held the caller's ready pipe) handed over twice
    /// (the keeper runs its binary again each time), then killed: a new server each time.
    func testADaemonizedMountSurvivesRestartsAndThenAKill() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 2 << 20)])
        let mnt = try scratch.directory("mnt")
        try check(mirrorfsBinary, ["mount", source, mnt, "--daemonize", "--log-file", scratch.file("log")])
        defer { if isMounted(mnt) { _ = try? execute(mirrorfsBinary, ["unmount", mnt]) } }
        for round in 1...2 {
            let said = try check(mirrorfsBinary, ["restart", mnt])
            XCTAssertTrue(said.contains("is served by a new server") && said.contains("restart \(round)"), said)
        }
        let before = rootAttribute(mnt, "pid")
        kill(pid_t(before ?? "0") ?? 0, SIGKILL)
        XCTAssertTrue(waitUntil("a server after the kill") { rootAttribute(mnt, "pid").map { $0 != before } ?? false })
        XCTAssertEqual(rootAttribute(mnt, "restarts"), "3")
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x55 1M 1M", mnt + "/disk.raw"])
        try check(mirrorfsBinary, ["unmount", mnt])
        XCTAssertFalse(isMounted(mnt))
        let log = try String(contentsOfFile: scratch.file("log"), encoding: .utf8)
        XCTAssertFalse(log.contains("cannot start the server"), log)
    }

    /// A hand-over asked while a new server is still starting (right after a kill) waits
    /// until that server serves: it is not killed by the request (no SIGUSR1 death).
    func testAHandOverAskedWhileAServerStartsWaitsForIt() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 2 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        kill(mount.serverPID, SIGKILL)
        usleep(5_000)
        kill(mount.process.processIdentifier, SIGUSR1)
        XCTAssertTrue(waitUntil("two restarts") { rootAttribute(mount, "restarts") == "2" })
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x66 0 64k", mount.image])
        XCTAssertEqual(mount.stop(), 0)
        let stderr = String(decoding: mount.stderrPipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertFalse(stderr.contains("SIGUSR1"), stderr)
        XCTAssertTrue(stderr.contains("planned restart of the server"), stderr)
    }

    /// `restart` on what is not a mirrorfs mount: one line, nothing signalled.
    func testRestartOfANonMountSaysSo() throws {
        let scratch = try Scratch()
        let result = try execute(mirrorfsBinary, ["restart", try scratch.directory("plain")])
        XCTAssertEqual(result.status, 1)
        XCTAssertEqual(result.stderr, "mirrorfs: error: '\(scratch.file("plain"))' is not a mirrorfs mount\n")
    }

    private func rootAttribute(_ mount: Mount, _ name: String) -> String? { rootAttribute(mount.mountpoint, name) }

    private func rootAttribute(_ mountpoint: String, _ name: String) -> String? {
        var value = [UInt8](repeating: 0, count: 4096)
        let n = clinux_getxattr(mountpoint, "user.mirrorfs." + name, &value, UInt(value.count))
        return n >= 0 ? String(decoding: value.prefix(n), as: UTF8.self) : nil
    }
}
