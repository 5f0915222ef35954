import CLinux
import Foundation
import XCTest

/// A host's first hour: the package, the service protocol, the status line, `list`, the
/// demo, the log, metrics, and errors that say what to do next.

/// The Debian package, extracted into a scratch root and used from there.
final class PackageTests: XCTestCase {
    func testPackageNeedsNoSwiftToolchainAndRunsAMirror() throws {
        let scratch = try Scratch()
        let built = try runTool("tools/package", [scratch.file("out")], timeout: 900)
        XCTAssertEqual(built.status, 0, built.output)
        let version = try String(contentsOfFile: projectRoot + "/VERSION", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let deb = scratch.file("out/mirrorfs_\(version)_amd64.deb")
        XCTAssertTrue(FileManager.default.fileExists(atPath: deb), built.output)
        let depends = try check("dpkg-deb", ["-f", deb, "Depends"]).trimmingCharacters(in: .whitespacesAndNewlines)
        // Versioned, from the libraries linked; fuse3 for fusermount3; nothing of Swift's.
        let packages = depends.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).split(separator: " ").first.map(String.init) ?? "" }
        XCTAssertEqual(Set(packages), ["libc6", "libfuse3-3", "fuse3", "libnbd0", "libstdc++6", "libgcc-s1"], depends)
        XCTAssertTrue(depends.contains("libc6 (>= ") && depends.contains("libfuse3-3 (>= "), depends)
        let root = try scratch.directory("root")
        try check("dpkg-deb", ["-x", deb, root])
        let binary = root + "/usr/bin/mirrorfs"

        // No library from the Swift toolchain: every one resolves to the system's.
        let toolchain = URL(fileURLWithPath: try which("swift")).resolvingSymlinksInPath()
            .deletingLastPathComponent().deletingLastPathComponent().path
        let libraries = try check("ldd", [binary])
        XCTAssertFalse(libraries.contains("not found"), libraries)
        XCTAssertFalse(libraries.contains(toolchain), libraries)
        for swiftLibrary in ["libswiftCore", "libFoundation", "lib_FoundationICU", "libdispatch", "libBlocksRuntime", "libswift_Concurrency"] {
            XCTAssertFalse(libraries.contains(swiftLibrary), "\(swiftLibrary) in:\n\(libraries)")
        }
        XCTAssertTrue(libraries.contains("libfuse3.so.3") && libraries.contains("libnbd.so.0"), libraries)
        XCTAssertTrue(try check(binary, ["--version"]).hasPrefix(version + " (commit "))

        // The extracted binary through a whole mount, mirror, complete cycle.
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 4 << 20), (20 << 20, 1 << 20)])
        let target = scratch.file("target.raw")
        let mountpoint = try scratch.directory("mnt")
        try check(binary, ["mount", source, mountpoint, "--target", target, "--daemonize", "--log-file", scratch.file("log")])
        defer { if isMounted(mountpoint) { _ = try? execute(binary, ["unmount", mountpoint]) } }
        try check("qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x6b 8M 1M", mountpoint + "/disk.raw"])
        // The packaged keeper (libc only) holds the mount: a server killed is replaced.
        let keeper = root + "/usr/libexec/mirrorfs/mirrorfs-keeper"
        let keeperLibraries = try check("objdump", ["-p", keeper]).split(separator: "\n").filter { $0.contains("NEEDED") }
        XCTAssertEqual(keeperLibraries.map { $0.split(separator: " ").last.map(String.init) ?? "" }, ["libc.so.6"], "\(keeperLibraries)")
        let server = try check(binary, ["list"]).split(separator: "\n").first { $0.hasPrefix(mountpoint + " ") }?
            .split(separator: " ", omittingEmptySubsequences: true).dropFirst(3).first.flatMap { pid_t($0) }
        XCTAssertNotNil(server)
        if let server { kill(server, SIGKILL) }
        try check("qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x6c 9M 1M", mountpoint + "/disk.raw"])
        XCTAssertTrue(try check(binary, ["status", mountpoint]).contains("1 restart"))
        waitReady(mountpoint)
        XCTAssertTrue(try check(binary, ["job", "complete", mountpoint]).contains("pivoted:"))
        try check(binary, ["unmount", mountpoint])
        XCTAssertTrue(try check("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target]).contains("identical"))

        // The man page renders; the completions load; the unit verifies.
        let manual = root + "/usr/share/man/man1/mirrorfs.1.gz"
        let page = try execute("man", ["-l", manual])
        XCTAssertEqual(page.status, 0, page.stderr)
        XCTAssertTrue(page.stdout.contains("mirrorfs") && page.stdout.contains("--copy-mode"), page.stdout)
        let bash = try execute("bash", ["-c", "source \(root)/usr/share/bash-completion/completions/mirrorfs && complete -p mirrorfs"])
        XCTAssertEqual(bash.status, 0, bash.stderr)
        XCTAssertTrue(bash.stdout.contains("mirrorfs"), bash.stdout)
        XCTAssertTrue(FileManager.default.fileExists(atPath: root + "/usr/share/zsh/vendor-completions/_mirrorfs"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: root + "/usr/share/fish/vendor_completions.d/mirrorfs.fish"))
        // Verified against the extracted binary and man page (the host has neither installed).
        let unit = try String(contentsOfFile: root + "/lib/systemd/system/mirrorfs@.service", encoding: .utf8)
        XCTAssertTrue(unit.contains("Type=notify") && unit.contains("EnvironmentFile=/etc/mirrorfs/%i.conf"), unit)
        let units = try scratch.directory("units")
        try unit.replacingOccurrences(of: "/usr/bin/mirrorfs", with: binary)
            .write(toFile: units + "/mirrorfs@.service", atomically: true, encoding: .utf8)
        let verify = try execute("systemd-analyze", ["verify", units + "/mirrorfs@.service"],
                                 environment: ["MANPATH": root + "/usr/share/man"])
        XCTAssertEqual(verify.status, 0, verify.stdout + verify.stderr)
        XCTAssertEqual(verify.stdout + verify.stderr, "")
    }
}

/// sd_notify: READY=1 only once the image and the control socket answer; STOPPING=1 at unmount.
final class SystemdNotifyTests: XCTestCase {
    func testReadyAfterImageAndSocketAnswerThenStopping() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20)
        let mountpoint = try scratch.directory("mnt")
        let listener = try DatagramListener(path: scratch.file("notify"))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: mirrorfsBinary)
        process.arguments = ["mount", source, mountpoint, "--target", scratch.file("target.raw")]
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = scratch.file("notify")
        process.environment = environment
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer {
            if process.isRunning { process.terminate(); process.waitUntilExit() }
            if isMounted(mountpoint) { _ = try? execute("/usr/bin/fusermount3", ["-u", "-z", mountpoint]) }
        }
        var before: [String] = []
        var ready: String?
        let deadline = Date().addingTimeInterval(20)
        while ready == nil, Date() < deadline, let message = listener.receive(timeout: 1) ?? (process.isRunning ? "" : nil) {
            if message.split(separator: "\n").contains("READY=1") { ready = message } else if !message.isEmpty { before.append(message) }
        }
        guard let ready else { return XCTFail("no READY=1; before it: \(before)") }
        // At READY=1 both answer: the image, and the control socket (through the CLI).
        var st = stat()
        XCTAssertEqual(stat(mountpoint + "/disk.raw", &st), 0)
        XCTAssertEqual(st.st_size, 16 << 20)
        XCTAssertTrue(try check(mirrorfsBinary, ["status", mountpoint, "--json"]).contains("\"device\": \"disk.raw\""))
        XCTAssertTrue(ready.contains("STATUS=") && ready.contains("MAINPID=\(process.processIdentifier)"), ready)
        XCTAssertTrue(before.allSatisfy { $0.hasPrefix("STATUS=") }, "before READY=1, only STATUS= lines: \(before)")
        // Unmount: STOPPING=1 comes, then the daemon exits.
        try check(mirrorfsBinary, ["unmount", mountpoint])
        var stopping = false
        let end = Date().addingTimeInterval(20)
        while !stopping, Date() < end, let message = listener.receive(timeout: 1) ?? (process.isRunning ? "" : nil) {
            stopping = message.split(separator: "\n").contains("STOPPING=1")
        }
        XCTAssertTrue(stopping, "no STOPPING=1 at unmount")
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0)
    }

    func testAbstractSocketNameIsSpokenToo() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 1 << 20)
        let mountpoint = try scratch.directory("mnt")
        let name = "mirrorfs-test-\(getpid())-\(UInt32.random(in: 0 ... .max))"
        let listener = try DatagramListener(abstract: name)
        let mount = try Mount(source: source, at: mountpoint, environment: ["NOTIFY_SOCKET": "@" + name])
        var got: [String] = []
        while let message = listener.receive(timeout: 5) {
            got.append(message)
            if message.contains("READY=1") { break }
        }
        XCTAssertTrue(got.contains { $0.contains("READY=1") }, "\(got)")
        XCTAssertEqual(mount.stop(), 0)
    }
}

/// `status --watch` in a real terminal (tmux), at 80 and 120 columns.
final class StatusLineTests: XCTestCase {
    func testWatchFitsThePaneRedrawsInPlaceAndEndsWithTheClosingLine() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 256 << 20, randomPieces: [(0, 48 << 20)])
        let target = scratch.file("a-rather-long-directory-name-for-the-target/and-a-long-file-name-too.raw")
        try FileManager.default.createDirectory(atPath: URL(fileURLWithPath: target).deletingLastPathComponent().path,
                                                withIntermediateDirectories: true)
        let mountpoint = try scratch.directory("mnt")
        // Slow enough that the watch redraws more than 20 times before ready.
        let mount = try Mount(source: source, at: mountpoint, extra: ["--target", target, "--speed", "3M"])
        // The server's socket in the scratch directory: nothing of tmux's stays in /tmp.
        let server = scratch.file("tmux.sock")
        defer { _ = try? execute("tmux", ["-S", server, "kill-server"]) }
        for width in [80, 120] {
            // Spawned, not run with pipes: the tmux server would hold them open.
            try startDaemon("tmux", ["-S", server, "new-session", "-d", "-s", "w\(width)", "-x", "\(width)", "-y", "12",
                                     "env -u COLUMNS \(mirrorfsBinary) status \(mountpoint) --watch; sleep 600"],
                            log: scratch.file("tmux-\(width).log"))
        }
        /// The pane's non-empty lines, wrapped rows joined (a line that wrapped shows as one
        /// line longer than the pane).
        func pane(_ width: Int) throws -> [String] {
            try check("tmux", ["-S", server, "capture-pane", "-p", "-J", "-t", "w\(width)"])
                .split(separator: "\n").map(String.init).filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
        }
        usleep(11_500_000)  // ≥ 20 redraws at two a second
        XCTAssertEqual(job(mount)?["ready"] as? Bool, false, "the job must still run while the watch redraws")
        for width in [80, 120] {
            let rows = try pane(width)
            XCTAssertEqual(rows.count, 1, "leftover rows at \(width) columns:\n\(rows.joined(separator: "\n"))")
            for row in rows { XCTAssertLessThan(row.trimmingCharacters(in: .whitespaces).count, width, "at \(width): \(row)") }
            XCTAssertTrue(rows.first?.hasPrefix("disk.raw: running") ?? false, "\(rows)")
            XCTAssertTrue(rows.first?.contains("eta ") ?? false, "\(rows)")
        }
        // The wide layout has room for more than the narrow one.
        let wide = try pane(120).joined(), narrow = try pane(80).joined()
        XCTAssertGreaterThan(wide.trimmingCharacters(in: .whitespaces).count, narrow.trimmingCharacters(in: .whitespaces).count + 10,
                             "wide: \(wide)\nnarrow: \(narrow)")

        try check(mirrorfsBinary, ["job", "set-speed", mountpoint, "0"])
        waitReady(mountpoint)
        try check(mirrorfsBinary, ["job", "complete", mountpoint])
        let closing = "pivoted: \(mountpoint)/disk.raw now serves \(target)"
        for width in [80, 120] {
            var rows: [String] = []
            waitUntil("the closing line at \(width) columns", timeout: 10) {
                rows = (try? pane(width)) ?? []
                return rows.first?.hasPrefix("pivoted: ") ?? false
            }
            XCTAssertEqual(rows.map { $0.trimmingCharacters(in: .whitespaces) }, [closing], "at \(width) columns")
        }
        XCTAssertEqual(mount.stop(), 0)
    }

    func testOneShotStatusShowsEveryFigureAndFitsColumns() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 16 << 20)])
        let mountpoint = try scratch.directory("mnt")
        let mount = try Mount(source: source, at: mountpoint, extra: ["--target", scratch.file("t.raw"), "--speed", "1M"])
        let wide = try execute(mirrorfsBinary, ["status", mountpoint], environment: ["COLUMNS": "400"]).stdout
        for part in ["disk.raw: running", "background", "copied ", "to copy ", "size 64.0 MiB", "dirty ", "copy ", "/s, dirty ",
                     "eta ", "elapsed 0:00:", "limit 1.0 MiB/s", "-> " + scratch.file("t.raw")] {
            XCTAssertTrue(wide.contains(part), "'\(part)' missing from: \(wide)")
        }
        for columns in [40, 60, 80, 100] {
            let line = try execute(mirrorfsBinary, ["status", mountpoint], environment: ["COLUMNS": "\(columns)"]).stdout
            XCTAssertEqual(line.split(separator: "\n").count, 1, line)
            XCTAssertLessThan(line.trimmingCharacters(in: .newlines).count, columns, line)
            XCTAssertTrue(line.hasPrefix("disk.raw: running"), line)
        }
        let json = try check(mirrorfsBinary, ["status", mountpoint, "--json"])
        let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        XCTAssertNotNil(object?["elapsed-seconds"] as? Double, json)
        XCTAssertEqual(object?["target"] as? String, scratch.file("t.raw"))
        XCTAssertEqual(mount.stop(), 0)
    }
}

/// `mirrorfs list`: every mount, also one that pivoted.
final class ListTests: XCTestCase {
    func testListShowsTwoMountsOneAfterAPivot() throws {
        let scratch = try Scratch()
        let first = try scratch.image("first.raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
        let second = try scratch.image("second.raw", size: 8 << 20)
        let target = scratch.file("moved.raw")
        let one = try Mount(source: first, at: try scratch.directory("one"), extra: ["--target", target])
        let two = try Mount(source: second, at: try scratch.directory("two"))
        waitReady(one.mountpoint)
        try check(mirrorfsBinary, ["job", "complete", one.mountpoint])
        let table = try check(mirrorfsBinary, ["list"]).split(separator: "\n").map(String.init)
        XCTAssertEqual(table.first?.split(separator: " ", omittingEmptySubsequences: true), ["MOUNTPOINT", "IMAGE", "SERVING", "PID", "RESTARTS", "JOB"])
        let rowOne = table.first { $0.hasPrefix(one.mountpoint + " ") }
        let rowTwo = table.first { $0.hasPrefix(two.mountpoint + " ") }
        XCTAssertEqual(rowOne?.split(separator: " ", omittingEmptySubsequences: true).map(String.init),
                       [one.mountpoint, "first.raw", target, "\(one.serverPID)", "0", "none"], table.joined(separator: "\n"))
        XCTAssertEqual(rowTwo?.split(separator: " ", omittingEmptySubsequences: true).map(String.init),
                       [two.mountpoint, "second.raw", second, "\(two.serverPID)", "0", "none"], table.joined(separator: "\n"))
        XCTAssertEqual(one.stop(), 0)
        XCTAssertEqual(two.stop(), 0)
    }

    func testListNamesAMountWhoseDaemonIsGone() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20)
        // Its own socket path: a daemon killed with -9 leaves the socket file behind.
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--qmp", scratch.file("qmp.sock")])
        mount.stop(signal: SIGKILL)
        let table = try check(mirrorfsBinary, ["list"])
        let row = table.split(separator: "\n").first { $0.hasPrefix(mount.mountpoint + " ") }.map(String.init) ?? ""
        XCTAssertTrue(row.contains("daemon gone: 'mirrorfs mount \(source) \(mount.mountpoint)' mounts it again"), table)
        let status = try execute(mirrorfsBinary, ["status", mount.mountpoint])
        XCTAssertEqual(status.status, 1)
        XCTAssertEqual(status.stderr, "mirrorfs: error: the daemon of '\(mount.mountpoint)' is gone (the mount is stale): 'mirrorfs mount \(source) \(mount.mountpoint)' mounts it again, with the same --target to resume its job\n")
        // unmount of it detaches it and says how to mount it again.
        let unmount = try check(mirrorfsBinary, ["unmount", mount.mountpoint])
        XCTAssertEqual(unmount, "the daemon of '\(mount.mountpoint)' was gone: detached its stale mount; 'mirrorfs mount \(source) \(mount.mountpoint)' mounts it again, with the same --target to resume its job\n")
        XCTAssertFalse(isMounted(mount.mountpoint))
    }
}

/// The demo, as a user runs it: its output shows the pivot, actively-synced and the check.
final class DemoTests: XCTestCase {
    func testDemoMirrorsCompletesAndChecksTheImage() throws {
        let started = Date()
        let demo = try runTool("tools/demo", [], timeout: 120, environment: ["MIRRORFS_BIN": mirrorfsBinary])
        XCTAssertEqual(demo.status, 0, demo.output)
        for expected in ["actively-synced: true", "pivoted: ", "now serves", "Images are identical.", "running"] {
            XCTAssertTrue(demo.output.contains(expected), "'\(expected)' missing from:\n\(demo.output)")
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 60, demo.output)
    }
}

/// What the daemon's log says, and that it stays bounded.
final class DaemonLogTests: XCTestCase {
    func testLogSpeaksSentencesAndRotatesAtItsCap() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
        let mountpoint = try scratch.directory("mnt")
        let log = scratch.file("daemon.log")
        try check(mirrorfsBinary, ["mount", source, mountpoint, "--daemonize", "--log-file", log, "--log-max-size", "4K"])
        defer { if isMounted(mountpoint) { _ = try? execute(mirrorfsBinary, ["unmount", mountpoint]) } }
        // Jobs started and cancelled until the log has rotated more than once.
        for round in 0..<12 {
            try check(mirrorfsBinary, ["job", "start", mountpoint, "--target", scratch.file("t\(round).raw"), "--state-dir", "none"])
            waitReady(mountpoint)
            try check(mirrorfsBinary, ["job", "change", mountpoint, "--copy-mode", "write-blocking"])
            try check(mirrorfsBinary, ["job", "cancel", mountpoint])
        }
        try check(mirrorfsBinary, ["job", "start", mountpoint, "--target", scratch.file("final.raw")])
        waitReady(mountpoint)
        try check(mirrorfsBinary, ["job", "complete", mountpoint])
        try check(mirrorfsBinary, ["unmount", mountpoint])
        let current = try String(contentsOfFile: log, encoding: .utf8)
        let older = try String(contentsOfFile: log + ".1", encoding: .utf8)
        XCTAssertLessThanOrEqual(current.utf8.count, 4096)
        XCTAssertLessThanOrEqual(older.utf8.count, 4096)
        XCTAssertFalse(FileManager.default.fileExists(atPath: log + ".2"))
        // Rotated more than once: the older file no longer holds the first rounds.
        XCTAssertFalse(older.contains(scratch.file("t0.raw")), older)
        XCTAssertFalse(current.contains(scratch.file("t0.raw")), current)
        let text = older + current
        for sentence in ["switched to write-blocking: from now on every write reaches the target",
                         "job 'disk.raw' mirrors \(source) to \(scratch.file("final.raw")): sync full, copy-mode background",
                         "pivoted: \(mountpoint)/disk.raw now serves \(scratch.file("final.raw"))",
                         "unmounted \(mountpoint)"] {
            XCTAssertTrue(text.contains(sentence), "'\(sentence)' missing from:\n\(text)")
        }
        XCTAssertFalse(text.contains("{\"event\""), "events are logged as sentences, not JSON:\n\(text)")
    }
}

/// `.status/metrics.prom`: Prometheus' text format, the job's figures with its device label.
final class MetricsTests: XCTestCase {
    func testMetricsMatchTheJob() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 2 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        func metrics() throws -> [String: Double] {
            let text = try String(contentsOfFile: mount.mountpoint + "/.status/metrics.prom", encoding: .utf8)
            var samples: [String: Double] = [:]
            for line in text.split(separator: "\n") where !line.hasPrefix("#") {
                let parts = line.split(separator: " ")
                XCTAssertEqual(parts.count, 2, "not a sample line: \(line)")
                samples[String(parts[0])] = Double(parts[1])
            }
            // Every metric has its HELP and TYPE.
            for name in Set(samples.keys.map { String($0.prefix { $0 != "{" }) }) {
                XCTAssertTrue(text.contains("# TYPE \(name) "), name)
                XCTAssertTrue(text.contains("# HELP \(name) "), name)
            }
            return samples
        }
        let at = "mountpoint=\"\(mount.mountpoint)\","
        var samples = try metrics()
        XCTAssertEqual(samples["mirrorfs_job_active{\(at)image=\"disk.raw\"}"], 0)
        XCTAssertEqual(samples["mirrorfs_image_size_bytes{\(at)image=\"disk.raw\"}"], Double(16 << 20))
        try check("qemu-io", ["-f", "raw", "-c", "write -P 1 0 64k", mount.image])
        try check(mirrorfsBinary, ["job", "start", mount.mountpoint, "--target", scratch.file("t.raw")])
        waitReady(mount.mountpoint)
        samples = try metrics()
        let info = try XCTUnwrap(job(mount))
        XCTAssertEqual(samples["mirrorfs_job_active{\(at)image=\"disk.raw\"}"], 1)
        XCTAssertEqual(samples["mirrorfs_job_ready{\(at)device=\"disk.raw\"}"], 1)
        XCTAssertEqual(samples["mirrorfs_job_status{\(at)device=\"disk.raw\",status=\"ready\"}"], 1)
        XCTAssertEqual(samples["mirrorfs_job_status{\(at)device=\"disk.raw\",status=\"running\"}"], 0)
        XCTAssertEqual(samples["mirrorfs_job_copy_mode{\(at)device=\"disk.raw\",mode=\"background\"}"], 1)
        XCTAssertEqual(samples["mirrorfs_job_offset_bytes{\(at)device=\"disk.raw\"}"], (info["offset"] as? NSNumber)?.doubleValue)
        XCTAssertEqual(samples["mirrorfs_job_len_bytes{\(at)device=\"disk.raw\"}"], (info["len"] as? NSNumber)?.doubleValue)
        XCTAssertGreaterThanOrEqual(samples["mirrorfs_image_writes_total{\(at)image=\"disk.raw\"}"] ?? 0, 1)
        XCTAssertEqual(samples["mirrorfs_image_serving_info{\(at)image=\"disk.raw\",serving=\"\(source)\"}"], 1)
        XCTAssertEqual(mount.stop(), 0)
    }
}

/// Errors that say what to do next.
final class GuidingErrorTests: XCTestCase {
    func testEachErrorNamesTheNextStep() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 8 << 20)])
        let mountpoint = try scratch.directory("mnt")
        let mount = try Mount(source: source, at: mountpoint, extra: ["--target", scratch.file("t.raw"), "--speed", "1M"])
        func error(_ arguments: [String]) throws -> String {
            let result = try execute(mirrorfsBinary, arguments)
            XCTAssertNotEqual(result.status, 0, result.stderr)
            XCTAssertEqual(result.stderr.filter { $0 == "\n" }.count, 1, result.stderr)
            return result.stderr
        }
        // Sizes: every accepted suffix named.
        let size = try error(["job", "set-speed", mountpoint, "12X"])
        XCTAssertTrue(size.contains("K/M/G/T") && size.contains("KiB/MiB/GiB/TiB") && size.contains("kB/MB/GB/TB"), size)
        try check(mirrorfsBinary, ["job", "set-speed", mountpoint, "2MB"])
        XCTAssertEqual(job(mount)?["speed"] as? Int, 2_000_000)
        try check(mirrorfsBinary, ["job", "set-speed", mountpoint, "1MiB"])
        XCTAssertEqual(job(mount)?["speed"] as? Int, 1 << 20)
        // complete before ready: wait, and how.
        let early = try error(["job", "complete", mountpoint])
        XCTAssertTrue(early.contains("is not ready") && early.contains("mirrorfs status \(mountpoint) --watch"), early)
        XCTAssertNotNil(job(mount), "a refused complete changes nothing")
        // A second mount on the mountpoint.
        let again = try error(["mount", source, mountpoint])
        XCTAssertTrue(again.contains("is already a mirrorfs mount") && again.contains("mirrorfs unmount \(mountpoint)"), again)
        // A busy image: which mount holds it, and how to end that.
        let other = try scratch.directory("other")
        let busy = try error(["mount", source, other])
        XCTAssertTrue(busy.contains("served by the mirrorfs mount '\(mountpoint)'") && busy.contains("mirrorfs unmount \(mountpoint)"), busy)
        let second = try scratch.image("second.raw", size: 64 << 20)
        let third = try Mount(source: second, at: try scratch.directory("third"))
        let held = try error(["job", "start", third.mountpoint, "--target", scratch.file("t.raw")])
        XCTAssertTrue(held.contains("target of the job on the mirrorfs mount '\(mountpoint)'") && held.contains("mirrorfs job cancel \(mountpoint)"), held)
        // help shows defaults.
        let help = try check(mirrorfsBinary, ["mount", "--help"]).split(whereSeparator: \.isWhitespace).joined(separator: " ")
        for fragment in ["(default: 64K)", "(default: 16M)", "(default: background)", "(default: full)", "(default: report)"] {
            XCTAssertTrue(help.contains(fragment), "'\(fragment)' missing from mount --help")
        }
        XCTAssertEqual(third.stop(), 0)
        XCTAssertEqual(mount.stop(), 0)
    }
}

// MARK: - Support

/// Waits for the mount's job to be ready; fails the test if it is not within the deadline.
func waitReady(_ mountpoint: String, timeout: TimeInterval = 30, file: StaticString = #filePath, line: UInt = #line) {
    let json = waitForJob(mountpoint, containing: "\"ready\": true", timeout: timeout)
    XCTAssertTrue(json.contains("\"ready\": true"), "not ready: \(json)", file: file, line: line)
}

/// A unix datagram socket the test reads notifications from.
final class DatagramListener {
    private let fd: Int32

    convenience init(path: String) throws {
        try self.init(address: Array(path.utf8), length: path.utf8.count + 1)
    }

    convenience init(abstract name: String) throws {
        try self.init(address: [0] + Array(name.utf8), length: name.utf8.count + 1)
    }

    private init(address: [UInt8], length: Int) throws {
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.EIO) }
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &sun.sun_path) { for (i, b) in address.enumerated() { $0[i] = b } }
        let bound = withUnsafePointer(to: &sun) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sa_family_t>.size + length)) }
        }
        guard bound == 0 else { close(fd); throw POSIXError(.EADDRINUSE) }
    }

    deinit { close(fd) }

    /// The next datagram, or nil after `timeout` seconds.
    func receive(timeout: Double) -> String? {
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, Int32(timeout * 1000)) > 0 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self) : nil
    }
}


/// SIGTERM ends the mount whichever of the daemon's threads the kernel gives it to (after
/// SIGSTOP/SIGCONT the main thread may not be the one): a service stop never hangs.
final class ExitSignalTests: XCTestCase {
    func testSIGTERMToAnyThreadUnmountsCleanly() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
        // The threads of one daemon (a job runs, so its threads exist too).
        let probe = try Mount(source: source, at: try scratch.directory("probe"), extra: ["--target", scratch.file("probe.raw")])
        waitReady(probe.mountpoint)
        let count = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(probe.serverPID)/task").count
        XCTAssertEqual(probe.stop(), 0)
        XCTAssertGreaterThan(count, 3)
        // Each thread by its place in the list: a fresh daemon for every one.
        var tried = 0
        for index in 1..<count {
            let mount = try Mount(source: source, at: try scratch.directory("mnt\(index)"),
                                  extra: ["--target", scratch.file("t\(index).raw")])
            waitReady(mount.mountpoint)
            let pid = mount.serverPID
            // Threads that block SIGTERM (libfuse's workers) never get a process's signal.
            let threads = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")
                .compactMap { Int32($0) }.filter { $0 != pid && !blocksSIGTERM(pid, $0) }.sorted()
            guard index - 1 < threads.count else { continue }
            XCTAssertEqual(clinux_tgkill(pid, threads[index - 1], SIGTERM), 0)
            XCTAssertEqual(mount.waitForExit(timeout: 10), 0, "SIGTERM to thread \(index) of \(threads.count)")
            XCTAssertFalse(isMounted(mount.mountpoint))
            tried += 1
        }
        XCTAssertGreaterThan(tried, 2, "threads that take SIGTERM besides the main one")
    }

    private func blocksSIGTERM(_ pid: Int32, _ tid: Int32) -> Bool {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/status", encoding: .utf8)) ?? ""
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("SigBlk:") }),
              let mask = UInt64(line.dropFirst("SigBlk:".count).trimmingCharacters(in: .whitespaces), radix: 16) else { return true }
        return mask & (1 << (UInt64(SIGTERM) - 1)) != 0
    }
}
