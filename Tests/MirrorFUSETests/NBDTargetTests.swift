import Foundation
import XCTest

/// Mirrors to NBD exports served by real qemu-nbd and nbdkit processes: on unix sockets
/// and on a test host in a network namespace, with faults injected by nbdkit's filters,
/// by nft on the host and by killing the daemon.
final class NBDTargetTests: XCTestCase {
    private func testHost(_ scratch: Scratch) throws -> NBDTestHost {
        let host = try NBDTestHost(runDirectory: scratch.path)
        addTeardownBlock { host.tearDown() }
        return host
    }

    /// The events of the mount as parsed objects.
    private func eventObjects(_ mount: Mount) -> [[String: Any]] {
        let text = (try? String(contentsOfFile: mount.mountpoint + "/.status/events.jsonl", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] }
    }

    private func assertIdentical(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", a, b])
        XCTAssertEqual(compare.status, 0, "\(a) vs \(b): " + compare.stdout + compare.stderr, file: file, line: line)
    }

    /// Pivots onto the target, unmounts, and checks the target holds the source's bytes.
    private func completeUnmountAndCompare(_ mount: Mount, _ source: String, _ target: String,
                                           file: StaticString = #filePath, line: UInt = #line) throws {
        try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
        waitUntil("the job is gone", file: file, line: line) { job(mount) == nil }
        XCTAssertEqual(mount.stop(), 0, file: file, line: line)
        try assertIdentical(source, target, file: file, line: line)
    }

    /// fio writing 4 KiB blocks through the mount for `seconds`; `result()` gives the exit
    /// status and the largest completion latency any write saw.
    private final class Writers {
        let process = Process()
        let output = Pipe()
        init(image: String, seconds: Int, jobs: Int = 2, size: String = "64M") throws {
            process.executableURL = URL(fileURLWithPath: try which("fio"))
            process.arguments = ["--name=load", "--filename=\(image)", "--rw=randwrite", "--bs=4k", "--direct=1",
                                 "--numjobs=\(jobs)", "--size=\(size)", "--time_based", "--runtime=\(seconds)",
                                 "--ioengine=psync", "--group_reporting", "--output-format=json"]
            process.standardOutput = output
            process.standardError = FileHandle.nullDevice
            try process.run()
        }

        func result() -> (status: Int32, errors: Int, maxLatency: Double, writes: Int) {
            let data = output.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            let json = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
            let job = (json?["jobs"] as? [[String: Any]])?.first ?? [:]
            let write = job["write"] as? [String: Any] ?? [:]
            let clat = write["clat_ns"] as? [String: Any] ?? [:]
            return (process.terminationStatus, job["error"] as? Int ?? -1,
                    (clat["max"] as? Double ?? -1) / 1e9, write["total_ios"] as? Int ?? 0)
        }
    }

    // MARK: - Bulk mirror over the veth

    func testHalfSparseImageMirrorsToQemuNBDOverVethIdenticalWithHolesThenPivots() throws {
        let scratch = try Scratch()
        let host = try testHost(scratch)
        let pieces = (0..<128).map { (UInt64($0) * 2 << 20, 1 << 20) }
        let source = try scratch.image("disk.raw", size: 256 << 20, randomPieces: pieces)
        let exported = try scratch.image("export.raw", size: 256 << 20)
        // --discard=unmap: write-zeroes may deallocate, so the export can keep holes.
        let uri = try host.qemuNBD(exported, extra: ["--discard=unmap"])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", uri])
        waitUntil("ready") { job(mount)?["status"] as? String == "ready" }
        try assertIdentical(source, uri)
        let sourceBlocks = try allocatedBytes(source), exportBlocks = try allocatedBytes(exported)
        XCTAssertLessThanOrEqual(abs(exportBlocks - sourceBlocks), sourceBlocks / 20,
                                 "export allocates \(exportBlocks) bytes, source \(sourceBlocks)")

        try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
        waitUntil("the job is gone") { job(mount) == nil }
        XCTAssertTrue(events(mount).contains("BLOCK_JOB_COMPLETED"))
        // The mount now serves the export: a write lands there and not in the source.
        let sourceSum = try sha256(source)
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 1000k 8k", mount.image])
        XCTAssertEqual(try sha256(source), sourceSum, "the source is not touched after the pivot")
        try check("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 1000k 8k", uri])
        // SEEK_DATA/SEEK_HOLE on the pivoted image come from the export's block status.
        let map = try check("qemu-img", ["map", "-f", "raw", "--output=json", mount.image])
        XCTAssertTrue(map.contains("\"data\": false"), "holes show through the mount after the pivot:\n\(map)")
        XCTAssertEqual(mount.stop(), 0)
    }

    // MARK: - Errors injected by nbdkit

    /// nbdkit's file plugin over `file` behind the error filter: 1 % of writes fail with EIO.
    private func failingExport(_ scratch: Scratch, file: String) throws -> UnixNBDServer {
        try UnixNBDServer("nbdkit", in: scratch.path, name: "errors",
                          ["--filter=error", "file", "file=\(file)", "error-pwrite=EIO", "error-pwrite-rate=1%"])
    }

    func testOnePercentWriteErrorsWithIgnoreStillCompleteIdentical() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 16 << 20)])
        let target = try scratch.image("target.raw", size: 64 << 20)
        let server = try failingExport(scratch, file: target)
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", server.uri, "--copy-mode", "write-blocking", "--on-target-error", "ignore"])
        let writers = try Writers(image: mount.image, seconds: 4)
        let result = writers.result()
        XCTAssertEqual(result.status, 0, "fio saw no error")
        XCTAssertEqual(result.errors, 0)
        let errors = eventObjects(mount).filter { $0["event"] as? String == "BLOCK_JOB_ERROR" }
        XCTAssertGreaterThan(errors.count, 0, "\(result.writes) writes met no injected error")
        XCTAssertTrue(errors.allSatisfy { ($0["data"] as? [String: Any])?["action"] as? String == "ignore" })
        waitUntil("ready") { job(mount)?["status"] as? String == "ready" }
        try completeUnmountAndCompare(mount, source, target)
    }

    func testOnePercentWriteErrorsWithReportFailTheJobAndNotTheUser() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20)
        let target = try scratch.image("target.raw", size: 64 << 20)
        let server = try failingExport(scratch, file: target)
        // sync none: every write of the clean image is mirrored at once.
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", server.uri, "--copy-mode", "write-blocking", "--sync", "none"])
        waitUntil("actively synced") { job(mount)?["actively-synced"] as? Bool == true }
        let writers = try Writers(image: mount.image, seconds: 4)
        let result = writers.result()
        XCTAssertEqual(result.status, 0, "fio saw no error")
        XCTAssertEqual(result.errors, 0)
        waitUntil("the job is gone") { job(mount) == nil }
        let completed = eventObjects(mount).first { $0["event"] as? String == "BLOCK_JOB_COMPLETED" }
        XCTAssertEqual((completed?["data"] as? [String: Any])?["error"] as? String, "Input/output error")
        XCTAssertEqual(eventObjects(mount).filter { $0["event"] as? String == "BLOCK_JOB_ERROR" }.first
                       .flatMap { ($0["data"] as? [String: Any])?["action"] as? String }, "report")
        // The image still works and still is the source.
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 64k", mount.image])
        try check("qemu-io", ["-f", "raw", "-U", "-r", "-c", "read -P 0x77 0 64k", source])  // served: locked
        XCTAssertEqual(mount.stop(), 0)
    }

    // MARK: - Network faults

    func testLinkCutInWriteBlockingModeHoldsNoWriteBeyondTheDeadlineAndStopThenResumeConverges() throws {
        let scratch = try Scratch()
        let host = try testHost(scratch)
        let source = try scratch.image("disk.raw", size: 128 << 20, randomPieces: [(0, 32 << 20)])
        let exported = try scratch.image("export.raw", size: 128 << 20)
        let uri = try host.qemuNBD(exported)
        let deadline = 3.0
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", uri, "--copy-mode", "write-blocking", "--on-target-error", "stop",
                                      "--nbd-timeout", "\(Int(deadline))"])
        waitUntil("actively synced") { job(mount)?["actively-synced"] as? Bool == true }
        let writers = try Writers(image: mount.image, seconds: 32)
        sleep(3)
        XCTAssertEqual(job(mount)?["actively-synced"] as? Bool, true, "synced while the link is up")
        let cutAt = Date()
        try host.cut(port: 10809)
        waitUntil("the job stops", timeout: deadline + 5) { job(mount)?["io-status"] as? String == "failed" }
        let detection = Date().timeIntervalSince(cutAt)
        XCTAssertLessThanOrEqual(detection, deadline + 1.5, "stopped \(detection) s after the cut")
        XCTAssertEqual(job(mount)?["actively-synced"] as? Bool, false)
        waitUntil("paused") { ["paused", "standby"].contains(job(mount)?["status"] as? String ?? "") }
        sleep(UInt32(max(0, 20 - Date().timeIntervalSince(cutAt))))
        try host.restore()
        try check(mirrorfsBinary, ["job", "resume", mount.mountpoint])
        waitUntil("actively synced again", timeout: 60) { job(mount)?["actively-synced"] as? Bool == true }
        let result = writers.result()
        XCTAssertEqual(result.status, 0, "fio saw no error")
        XCTAssertEqual(result.errors, 0)
        XCTAssertGreaterThan(result.writes, 1000)
        XCTAssertLessThan(result.maxLatency, deadline + 1, "the slowest user write took \(result.maxLatency) s")
        print("link cut: job stopped \(detection) s after the cut; \(result.writes) user writes, slowest \(result.maxLatency) s")
        try completeUnmountAndCompare(mount, source, exported)
    }

    func testHungServerIsDetectedWithinTheDeadline() throws {
        let scratch = try Scratch()
        let host = try testHost(scratch)
        let source = try scratch.image("disk.raw", size: 16 << 20)
        let control = scratch.file("pause.sock")
        // nbdkit on the test host: TCP stays up while the server answers nothing.
        let uri = try host.nbdkit(["--filter=pause", "memory", "size=16M", "pause-control=\(control)"])
        let deadline = 2.0
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", uri, "--copy-mode", "write-blocking", "--on-target-error", "stop",
                                      "--nbd-timeout", "\(Int(deadline))"])
        waitUntil("actively synced") { job(mount)?["actively-synced"] as? Bool == true }
        XCTAssertEqual(try pauseControl(control, "p"), "P")
        let started = Date()
        try check("qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x42 0 4k", mount.image])
        let waited = Date().timeIntervalSince(started)
        XCTAssertLessThan(waited, deadline + 1, "a write waited \(waited) s on a hung server")
        XCTAssertGreaterThanOrEqual(waited, deadline - 0.5, "the write should have tried the target")
        XCTAssertEqual(job(mount)?["io-status"] as? String, "failed")
        XCTAssertEqual(job(mount)?["actively-synced"] as? Bool, false)
        XCTAssertEqual(try pauseControl(control, "r"), "R")
        try check(mirrorfsBinary, ["job", "resume", mount.mountpoint])
        waitUntil("actively synced again") { job(mount)?["actively-synced"] as? Bool == true }
        try check("qemu-io", ["-f", "raw", "-c", "read -P 0x42 0 4k", uri])
        XCTAssertEqual(mount.stop(), 0)
    }

    /// Sends one command byte to nbdkit's pause filter and returns its one-byte answer.
    private func pauseControl(_ socket: String, _ command: String) throws -> String {
        let script = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode()); print(s.recv(1).decode())"
        return try check(testPython, ["-c", script, socket, command]).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    // MARK: - Crash, QMP and bad input

    func testKilledDaemonResumesAnNBDMirrorFromItsDirtyLog() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 256 << 20, randomPieces: [(0, 8 << 20)])
        let exported = try scratch.image("export.raw", size: 256 << 20)
        var server = try UnixNBDServer("qemu-nbd", in: scratch.path, name: "export", [exported])
        let arguments = ["--target", server.uri, "--state-dir", scratch.path]
        let mountpoint = try scratch.directory("mnt")
        var mount: Mount? = try Mount(source: source, at: mountpoint, extra: arguments)
        waitUntil("ready") { job(mount!)?["status"] as? String == "ready" }
        // Two sweeps clear the log of what is synced. Then the server hangs, a write
        // reaches the source only, and both the daemon and the server die.
        sleep(11)
        server.send(SIGSTOP)
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x99 200M 1M", mount!.image])
        mount!.stop(signal: SIGKILL)
        mount = nil
        server.stop()
        XCTAssertNotEqual(try sha256(source), try sha256(exported), "the export misses the last write")
        server = try UnixNBDServer("qemu-nbd", in: scratch.path, name: "export", [exported])
        let resumed = try Mount(source: source, at: mountpoint, extra: arguments)
        waitUntil("ready after the restart") { job(resumed)?["status"] as? String == "ready" }
        XCTAssertEqual(job(resumed)?["resync-bytes"] as? Int, 64 << 20, "only the written region is resynced")
        try check(mirrorfsBinary, ["job", "complete", resumed.mountpoint])
        waitUntil("the job is gone") { job(resumed) == nil }
        XCTAssertEqual(resumed.stop(), 0)
        try assertIdentical(source, exported)
    }

    /// qemu-nbd as most people start it: one client at a time, exiting when it leaves.
    func testDaemonizedMountMirrorsToASingleClientQemuNBD() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 8 << 20)])
        let exported = try scratch.image("export.raw", size: 32 << 20)
        let socket = scratch.file("single.sock")
        try startDaemon("qemu-nbd", ["--fork", "-f", "raw", "-k", socket, exported], log: scratch.file("single.log"))
        let mountpoint = try scratch.directory("mnt")
        try check(mirrorfsBinary, ["mount", source, mountpoint, "--target", "nbd+unix:///?socket=\(socket)",
                                   "--daemonize", "--log-file", scratch.file("daemon.log")])
        defer { _ = try? execute(mirrorfsBinary, ["unmount", mountpoint]) }
        XCTAssertTrue(waitForJob(mountpoint, containing: "\"ready\": true").contains("\"ready\": true"))
        try check(mirrorfsBinary, ["job", "complete", mountpoint])
        XCTAssertEqual(waitForJob(mountpoint, containing: "null").trimmingCharacters(in: .whitespacesAndNewlines), "null")
        try check(mirrorfsBinary, ["unmount", mountpoint])
        try assertIdentical(source, exported)
    }

    func testJobStartDriveMirrorToAnExistingExportAndItsErrors() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(1 << 20, 4 << 20)])
        let exported = try scratch.image("export.raw", size: 32 << 20)
        let small = try scratch.image("small.raw", size: 16 << 20)
        let server = try UnixNBDServer("qemu-nbd", in: scratch.path, name: "export", [exported])
        let smallServer = try UnixNBDServer("qemu-nbd", in: scratch.path, name: "small", [small])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        let wrongSize = try execute(mirrorfsBinary, ["job", "start", mount.mountpoint, "--target", smallServer.uri])
        XCTAssertNotEqual(wrongSize.status, 0)
        XCTAssertTrue(wrongSize.stderr.contains("has \(16 << 20) bytes but the source has \(32 << 20)"), wrongSize.stderr)
        let absent = try execute(mirrorfsBinary, ["job", "start", mount.mountpoint, "--target", "nbd+unix:///?socket=\(scratch.file("none.sock"))"])
        XCTAssertNotEqual(absent.status, 0)
        XCTAssertTrue(absent.stderr.contains("cannot connect"), absent.stderr)
        XCTAssertNil(job(mount), "no job after refused starts")

        try check(mirrorfsBinary, ["job", "start", mount.mountpoint, "--target", server.uri])
        waitUntil("ready") { job(mount)?["status"] as? String == "ready" }
        try completeUnmountAndCompare(mount, source, exported)
    }

    func testMountRefusesUnusableNBDTargetsWithOneLineAndTouchesNothing() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 1 << 20)])
        let exported = try scratch.image("export.raw", size: 16 << 20, randomPieces: [(0, 1 << 20)])
        let small = try scratch.image("small.raw", size: 8 << 20)
        let readOnly = try UnixNBDServer("qemu-nbd", in: scratch.path, name: "ro", ["-r", exported])
        let smallServer = try UnixNBDServer("qemu-nbd", in: scratch.path, name: "small", [small])
        let sums = try [source, exported, small].map(sha256)
        let mountpoint = try scratch.directory("mnt")
        let cases: [(String, String)] = [
            (readOnly.uri, "read-only"),
            (smallServer.uri, "has 8388608 bytes but the source has 16777216"),
            ("nbd+unix:///?socket=\(scratch.file("missing.sock"))", "cannot connect"),
            ("nbd+unix:///export", "needs ?socket=PATH"),
            ("nbd://", "has no host"),
        ]
        // With --daemonize the parent leaves the connection to the daemon (a server may take
        // one client only); the daemon's refusal comes back the same way.
        for (target, expected) in cases {
            for extra in [[], ["--daemonize", "--log-file", scratch.file("daemon.log")]] {
                let result = try execute(mirrorfsBinary, ["mount", source, mountpoint, "--target", target] + extra)
                XCTAssertNotEqual(result.status, 0, target)
                XCTAssertTrue(result.stderr.contains(expected), "\(target) \(extra): \(result.stderr)")
                XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, "one line: \(result.stderr)")
                XCTAssertFalse(isMounted(mountpoint))
            }
        }
        let badTimeout = try execute(mirrorfsBinary, ["mount", source, mountpoint, "--target", readOnly.uri, "--nbd-timeout", "0"])
        XCTAssertNotEqual(badTimeout.status, 0)
        XCTAssertTrue(badTimeout.stderr.contains("--nbd-timeout"), badTimeout.stderr)
        XCTAssertEqual(try [source, exported, small].map(sha256), sums, "no byte changed")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: scratch.path).filter { $0.hasSuffix(".dirtylog") }, [],
                       "no dirty log was left behind")
    }
}
