import Foundation
import XCTest

/// The control socket and the CLI, against a real daemon and real QMP clients.
final class ControlTests: XCTestCase {
    private let pythonTests = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("python").path

    func testQemuQMPLibraryRunsAWholeJobWithQEMUsEventOrder() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 16 << 20)])
        let socket = scratch.file("qmp.sock")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--qmp", socket])
        XCTAssertEqual(try fileStatus(socket).st_mode & 0o777, 0o600)
        let out = try check(testPython, [pythonTests + "/qmp_lifecycle.py", socket, "disk.raw", scratch.file("target.raw")])
        XCTAssertTrue(out.contains("BLOCK_JOB_COMPLETED"), out)
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, scratch.file("target.raw")])
        XCTAssertEqual(compare.status, 0)
        XCTAssertEqual(mount.stop(), 0)
    }

    func testQmpShellAnswersTypedCommands() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 1 << 20)
        let socket = scratch.file("qmp.sock")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--qmp", socket])
        let script = "printf 'query-block-jobs\\nquery-version\\n' | '\(URL(fileURLWithPath: testPython).deletingLastPathComponent().path)/qmp-shell' '\(socket)'"
        let out = try check("/bin/sh", ["-c", script])
        XCTAssertTrue(out.contains(#"{"return": []}"#), out)
        XCTAssertTrue(out.contains(#""major": 8"#), out)
        XCTAssertEqual(mount.stop(), 0)
    }

    /// Raw socket helpers for the robustness cases.
    private func connect(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard ok == 0 else { throw POSIXError(.ECONNREFUSED) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    private func sendText(_ fd: Int32, _ text: String) {
        let bytes = Array(text.utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            sent += n
        }
    }

    /// Reads one CRLF-terminated line ("" when the server closed the connection).
    private func readLine(_ fd: Int32) -> String {
        var line = [UInt8]()
        var byte: UInt8 = 0
        while recv(fd, &byte, 1, 0) == 1 {
            if byte == 0x0a { break }
            if byte != 0x0d { line.append(byte) }
        }
        return String(decoding: line, as: UTF8.self)
    }

    /// Reads the next reply, skipping asynchronous events.
    private func readReply(_ fd: Int32) -> String {
        var line = readLine(fd)
        while line.hasPrefix(#"{"event""#) { line = readLine(fd) }
        return line
    }

    private func negotiated(_ path: String) throws -> Int32 {
        let fd = try connect(path)
        XCTAssertTrue(readLine(fd).hasPrefix(#"{"QMP": {"version": {"qemu": "#))
        sendText(fd, #"{"execute":"qmp_capabilities"}"#)
        XCTAssertEqual(readLine(fd), #"{"return": {}}"#)
        return fd
    }

    private func rssKiB(_ pid: Int32) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }

    func testBadInputGetsQEMUsErrorsAndNeitherTheDaemonNorTheMountSuffers() throws {
        let scratch = try Scratch()
        // Data in two copy operations apart: at speed 1 the second waits for days, so the
        // job is still running when `complete` comes (one piece would be copied at once).
        let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 1 << 20), (8 << 20, 1 << 20)])
        let socket = scratch.file("qmp.sock")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--qmp", socket])
        let fd = try negotiated(socket)
        defer { close(fd) }
        // Malformed JSON, a non-object, an unknown command, wrong types: an error each, same connection.
        let cases: [(String, String)] = [
            (#"{"execute": }"#, #"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#),
            ("[1, 2]", #"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#),
            (#"{"execute":"frobnicate","id":1}"#, #"{"error": {"class": "CommandNotFound", "desc": "The command frobnicate has not been found"}, "id": 1}"#),
            (#"{"execute":"block-job-cancel","arguments":{"device":"disk.raw","force":"yes"}}"#, #"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'force', expected: boolean"}}"#),
            (#"{"execute":"block-job-complete","arguments":{"device":"disk.raw"}}"#, #"{"error": {"class": "DeviceNotActive", "desc": "Block job 'disk.raw' not found"}}"#),
            (#"{"execute":"job-complete","arguments":{"id":"disk.raw"}}"#, #"{"error": {"class": "GenericError", "desc": "Job not found"}}"#),
        ]
        for (input, expected) in cases {
            sendText(fd, input)
            XCTAssertEqual(readLine(fd), expected, input)
        }
        // A job in the wrong state for a verb.
        sendText(fd, #"{"execute":"drive-mirror","arguments":{"device":"disk.raw","target":"\#(scratch.file("t.raw"))","sync":"full","speed":1}}"#)
        XCTAssertEqual(readReply(fd), #"{"return": {}}"#)
        sendText(fd, #"{"execute":"block-job-complete","arguments":{"device":"disk.raw"},"id":"c"}"#)
        XCTAssertEqual(readReply(fd), #"{"error": {"class": "GenericError", "desc": "Job 'disk.raw' in state 'running' cannot accept command verb 'complete'"}, "id": "c"}"#)
        sendText(fd, #"{"execute":"block-job-cancel","arguments":{"device":"disk.raw","force":true}}"#)
        XCTAssertEqual(readReply(fd), #"{"return": {}}"#)

        let pid = mount.serverPID
        // A message without end: refused at the cap (1 MiB) and the client dropped.
        let huge = try connect(socket)
        _ = readLine(huge)
        sendText(huge, #"{"execute":"qmp_capabilities"}"#)
        _ = readLine(huge)
        sendText(huge, #"{"execute": ""# + String(repeating: "a", count: 8 << 20))
        XCTAssertEqual(readReply(huge), #"{"error": {"class": "GenericError", "desc": "JSON parse error, message too large"}}"#)
        XCTAssertEqual(readLine(huge), "", "the server closed the connection")
        close(huge)
        // A client that leaves mid-command.
        let leaver = try connect(socket)
        sendText(leaver, #"{"execute":"qmp_capabilities"}{"execute":"query-bl"#)
        close(leaver)
        // A hundred clients at once.
        let many = try (0..<100).map { _ in try negotiated(socket) }
        for client in many { sendText(client, #"{"execute":"query-version"}"#) }
        for client in many {
            let answer = readReply(client)
            XCTAssertTrue(answer.hasPrefix(#"{"return": {"qemu": "#), answer)
            close(client)
        }
        // The first connection still works, the mount too, and memory stayed bounded.
        sendText(fd, #"{"execute":"query-version","id":2}"#)
        let last = readReply(fd)
        XCTAssertTrue(last.hasPrefix(#"{"return": {"qemu": "#), last)
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x12 0 64k", "-c", "read -P 0x12 0 64k", mount.image])
        let rss = rssKiB(pid)
        XCTAssertLessThan(rss, 128 * 1024, "daemon RSS \(rss) KiB after the robustness cases")
        print("daemon RSS after robustness cases: \(rss) KiB")
        XCTAssertEqual(mount.stop(), 0)
    }

    func testCLIRunsTheLifecycleAndStatusWatchFollowsIt() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 32 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        let target = scratch.file("target.raw")
        XCTAssertEqual(try check(mirrorfsBinary, ["status", mount.mountpoint]), "no job; \(mount.image) serves \(source)\n")
        XCTAssertEqual(try check(mirrorfsBinary, ["status", mount.mountpoint, "--json"]), "null\n")
        try check(mirrorfsBinary, ["job", "start", mount.mountpoint, "--target", target, "--speed", "8M"])
        // status --watch with stdout not a terminal: one plain line per update, until the job ends.
        let watch = Process()
        watch.executableURL = URL(fileURLWithPath: mirrorfsBinary)
        watch.arguments = ["status", mount.mountpoint, "--watch"]
        let out = Pipe()
        watch.standardOutput = out
        try watch.run()
        let statusJSON = try check(mirrorfsBinary, ["status", mount.mountpoint, "--json"])
        XCTAssertTrue(statusJSON.contains(#""type": "mirror""#) && statusJSON.contains(#""actively-synced": false"#), statusJSON)
        let deadline = Date().addingTimeInterval(30)
        while !(try check(mirrorfsBinary, ["status", mount.mountpoint, "--json"])).contains(#""status": "ready""#) && Date() < deadline {
            usleep(100_000)
        }
        try check(mirrorfsBinary, ["job", "change", mount.mountpoint, "--copy-mode", "write-blocking"])
        while !(try check(mirrorfsBinary, ["status", mount.mountpoint, "--json"])).contains(#""actively-synced": true"#)
                && Date() < deadline { usleep(100_000) }
        usleep(1_200_000)  // the watcher redraws every 0.5 s
        let refused = try execute(mirrorfsBinary, ["job", "change", mount.mountpoint, "--copy-mode", "background"])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertEqual(refused.stderr, "mirrorfs: error: Change to copy mode 'background' is not implemented\n")
        try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
        watch.waitUntilExit()
        XCTAssertEqual(watch.terminationStatus, 0)
        let lines = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).split(separator: "\n")
        XCTAssertGreaterThan(lines.count, 2, "\(lines)")
        XCTAssertTrue(lines.first?.hasPrefix("disk.raw: running  ") ?? false, "\(lines)")
        XCTAssertTrue(lines.first?.contains("  background  [") ?? false, "\(lines)")
        XCTAssertTrue(lines.contains { $0.contains("  copy ") && $0.contains("/s, dirty ") && $0.contains("/s  eta 0:00:0") },
                      "rates and remaining time: \(lines)")
        XCTAssertTrue(lines.contains { $0.contains("actively-synced  write-blocking") }, "\(lines)")
        XCTAssertEqual(lines.last.map(String.init), "pivoted: \(mount.image) now serves \(target)")
        XCTAssertEqual(try check(mirrorfsBinary, ["status", mount.mountpoint]), "no job; \(mount.image) serves \(target)\n")
        let noJob = try execute(mirrorfsBinary, ["job", "pause", mount.mountpoint])
        XCTAssertEqual(noJob.stderr, "mirrorfs: error: no job runs on this mount\n")
        XCTAssertEqual(mount.stop(), 0)
    }

    func testStatusWatchExitsNonZeroWhenTheJobFails() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 48 << 20, randomPieces: [(0, 48 << 20)])
        let small = try scratch.directory("small")
        try check("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", small])
        defer { _ = try? execute("umount", ["-l", small]) }
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        try check(mirrorfsBinary, ["job", "start", mount.mountpoint, "--target", small + "/t.raw", "--speed", "16M"])
        let result = try execute(mirrorfsBinary, ["status", mount.mountpoint, "--watch"], timeout: 60)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertEqual(result.stderr, "mirrorfs: error: the job failed: No space left on device\n")
        XCTAssertEqual(mount.stop(), 0)
    }
}
