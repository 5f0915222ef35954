import Foundation
import XCTest

/// SPEC sections 6 and 9: whatever the operator or the system does, no acknowledged write
/// is lost and no false actively-synced is shown. Real mounts, real QEMU tools.
final class SafetyTests: XCTestCase {
    private func mirrorfs(_ arguments: [String], timeout: TimeInterval = 60) throws -> CommandResult {
        try execute(mirrorfsBinary, arguments, timeout: timeout)
    }

    private func assertOneLineError(_ result: CommandResult, mentions expected: String,
                                    file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertNotEqual(result.status, 0, "accepted: \(result.stdout)", file: file, line: line)
        let lines = result.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "one line: \(result.stderr)", file: file, line: line)
        XCTAssertTrue(result.stderr.hasPrefix("mirrorfs: error: "), result.stderr, file: file, line: line)
        XCTAssertTrue(result.stderr.contains(expected), "'\(expected)' not in: \(result.stderr)", file: file, line: line)
    }

    private func identical(_ a: String, _ b: String) throws -> Bool {
        try execute("cmp", ["-s", a, b]).status == 0
    }

    private func qemuIO(_ image: String, _ commands: [String], extra: [String] = []) throws -> CommandResult {
        try execute("qemu-io", ["-f", "raw"] + extra + commands.flatMap { ["-c", $0] } + [image])
    }

    /// Mounts in the background (as a user would after a crash) and returns the result.
    private func mountDaemon(_ arguments: [String], log: String) throws -> CommandResult {
        try mirrorfs(["mount"] + arguments + ["--daemonize", "--log-file", log])
    }

    private func daemonPids(_ mountpoint: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            let argv = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            let server = argv.count > 3 && argv[0].hasSuffix("mirrorfs") && argv[1] == "mount"
            let keeper = argv.count > 3 && argv[0].hasSuffix("mirrorfs-keeper")
            return (server || keeper) && argv.contains(mountpoint)
        }
        // Keepers first: a server killed before its keeper would be started again.
        .sorted { a, b in isKeeper(a) && !isKeeper(b) }
    }

    private func isKeeper(_ pid: Int32) -> Bool {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe"))?.hasSuffix("mirrorfs-keeper") ?? false
    }

    private func killDaemon(_ mountpoint: String) {
        for pid in daemonPids(mountpoint) { kill(pid, SIGKILL) }
        _ = waitUntil("the daemon of \(mountpoint) to die") { daemonPids(mountpoint).isEmpty }
    }

    /// Waits for ready, checks job.json says `reason`, unmounts, and checks target == source.
    private func assertReadyWith(_ reason: String, then mnt: String, leaves source: String, equalTo target: String,
                                 _ message: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let json = waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertTrue(json.contains(reason), json, file: file, line: line)
        try unmount(mnt, file: file, line: line)
        XCTAssertTrue(try identical(source, target), message, file: file, line: line)
    }

    /// A file system of `type` (tmpfs with `size`) mounted in the scratch directory until the test ends.
    private func fileSystem(_ type: String, size: String? = nil, in scratch: Scratch, named name: String = "small") throws -> String {
        let directory = try scratch.directory(name)
        let options = size.map { ["-o", "size=\($0)"] } ?? []
        XCTAssertEqual(try execute("mount", ["-t", type] + options + [type, directory]).status, 0)
        addTeardownBlock { _ = try? execute("umount", ["-l", directory]) }
        return directory
    }

    /// A mount of 24 MiB of data mirrored into an 8 MiB tmpfs: the job fails (ENOSPC, report).
    private func jobThatFillsItsTarget(_ scratch: Scratch) throws -> (source: String, target: String, small: String,
                                                                       mnt: String, log: String, command: [String]) {
        let small = try fileSystem("tmpfs", size: "8M", in: scratch)
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 24 << 20)])
        let target = small + "/new.raw"
        let mnt = try scratch.directory("mnt")
        let log = scratch.file("daemon.log")
        let command = [source, mnt, "--target", target]
        XCTAssertEqual(try mountDaemon(command, log: log).status, 0)
        XCTAssertEqual(waitForJob(mnt, containing: "null").trimmingCharacters(in: .whitespacesAndNewlines), "null")
        return (source, target, small, mnt, log, command)
    }

    private func unmount(_ mountpoint: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let result = try mirrorfs(["unmount", mountpoint])
        XCTAssertEqual(result.status, 0, result.stderr, file: file, line: line)
        _ = waitUntil("the daemon of \(mountpoint) to exit", file: file, line: line) { daemonPids(mountpoint).isEmpty }
    }

    // MARK: - 1. A completed migration is never undone

    func testTheOldMountCommandIsRefusedAfterACompletedMigrationAndTheTargetMounts() throws {
        for ending in ["kill -9", "unmount"] {
            let scratch = try Scratch()
            let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 4 << 20)])
            let target = scratch.file("new.raw")
            let mnt = try scratch.directory("mnt")
            let log = scratch.file("daemon.log")
            let command = [source, mnt, "--target", target]
            XCTAssertEqual(try mountDaemon(command, log: log).status, 0)
            waitForJob(mnt, containing: #""ready": true"#)
            XCTAssertEqual(try mirrorfs(["job", "complete", mnt]).status, 0)
            XCTAssertEqual(try qemuIO(mnt + "/disk.raw", ["write -P 0x5c 1M 64k", "flush"]).status, 0)
            let sourceBefore = try sha256(source)
            if ending == "kill -9" { killDaemon(mnt) } else { try unmount(mnt) }

            let again = try mountDaemon(command, log: log)
            assertOneLineError(again, mentions: target)
            XCTAssertTrue(again.stderr.contains("mount '\(target)' instead"), again.stderr)
            XCTAssertEqual(try sha256(source), sourceBefore, "\(ending): the refused command touched the source")
            XCTAssertEqual(try qemuIO(target, ["read -P 0x5c 1M 64k"]).stdout.contains("Pattern verification failed"), false)

            XCTAssertEqual(try mountDaemon([target, mnt], log: log).status, 0, ending)
            let read = try qemuIO(mnt + "/new.raw", ["read -P 0x5c 1M 64k"], extra: ["-U", "-r"])
            XCTAssertTrue(read.stdout.contains("read 65536/65536"), read.stdout)
            XCTAssertFalse(read.stdout.contains("Pattern verification failed"), "\(ending): the post-pivot write is gone")
            try unmount(mnt)
        }
    }

    // MARK: - 2. A failed job's log covers the writes after the failure

    func testWritesAfterAFailedJobAreCopiedByTheRestart() throws {
        let scratch = try Scratch()
        let (source, target, small, mnt, log, command) = try jobThatFillsItsTarget(scratch)
        let events = (try? String(contentsOfFile: mnt + "/.status/events.jsonl", encoding: .utf8)) ?? ""
        XCTAssertTrue(events.contains("No space left on device"), events)
        // Written after the failure, straight through the mount.
        XCTAssertEqual(try qemuIO(mnt + "/disk.raw", ["write -P 0x6d 28M 1M", "flush"]).status, 0)
        try unmount(mnt)
        XCTAssertEqual(try execute("mount", ["-o", "remount,size=64M", small]).status, 0)
        XCTAssertEqual(try mountDaemon(command, log: log).status, 0)
        try assertReadyWith("resumed from the dirty log", then: mnt, leaves: source, equalTo: target, "the target lacks writes made after the failure")
    }

    // MARK: - 3. A partial source write is dirty, never synced

    func testAPartiallyAppliedSourceWriteIsCopiedBeforeActivelySynced() throws {
        let scratch = try Scratch()
        let small = try fileSystem("tmpfs", size: "4M", in: scratch)
        let source = small + "/disk.raw"
        XCTAssertEqual(try execute("truncate", ["-s", "16M", source]).status, 0)
        XCTAssertEqual(try qemuIO(source, ["write -P 0x11 0 3584k"]).status, 0)
        let target = scratch.file("new.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", target, "--copy-mode", "write-blocking"])
        waitForJob(mount.mountpoint, containing: #""actively-synced": true"#)
        // About 512 KiB are free: the write reaches the source in part, then fails.
        let write = try execute("dd", ["if=/dev/urandom", "of=\(mount.image)", "bs=1M", "count=1", "seek=8",
                                       "conv=notrunc,fsync", "oflag=direct"])
        XCTAssertNotEqual(write.status, 0, "the write was expected to hit ENOSPC")
        let json = waitForJob(mount.mountpoint, containing: #""actively-synced": true"#)
        XCTAssertTrue(json.contains(#""dirty-bytes": 0"#), json)
        XCTAssertTrue(try identical(source, target), "actively-synced while the target lacks part of a write")
        XCTAssertEqual(mount.stop(), 0)
    }

    // MARK: - 4. Image locks, as QEMU's

    func testServedImagesAreLockedAgainstQEMUsToolsAndAnotherMirrorfs() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 1 << 20)])
        let target = scratch.file("new.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", target])
        waitForJob(mount.mountpoint, containing: #""ready": true"#)
        for image in [source, target] {
            let write = try qemuIO(image, ["write -P 0x1 0 4k"])
            XCTAssertNotEqual(write.status, 0, "qemu-io wrote a served image")
            XCTAssertTrue(write.stderr.contains(#"Failed to get "write" lock"#), write.stderr)
            let copy = scratch.file("copy.raw")
            let convert = try execute("qemu-img", ["convert", "-f", "raw", "-O", "raw", image, copy])
            XCTAssertNotEqual(convert.status, 0, convert.stdout)
            XCTAssertTrue(convert.stderr.contains(#"Failed to get shared "write" lock"#), convert.stderr)
            let resize = try execute("qemu-img", ["resize", "-f", "raw", image, "32M"])
            XCTAssertTrue(resize.stderr.contains(#"Failed to get "write" lock"#), resize.stderr)
            XCTAssertEqual(try execute("qemu-img", ["convert", "-U", "-f", "raw", "-O", "raw", image, copy]).status, 0)
            XCTAssertEqual(try fileStatus(image).st_size, 16 << 20)
            XCTAssertEqual(try qemuIO(image, ["read 0 4k"], extra: ["-U", "-r"]).status, 0)
        }
        // Another mirrorfs: the same source, or a second job into the same target.
        assertOneLineError(try mirrorfs(["mount", source, try scratch.directory("mnt2")]), mentions: "in use by another process")
        let other = try scratch.image("other.raw", size: 16 << 20)
        assertOneLineError(try mirrorfs(["mount", other, try scratch.directory("mnt3"), "--target", target]),
                           mentions: "in use by another process")
        // qemu-storage-daemon cannot export it either.
        let qsd = try execute("qemu-storage-daemon", ["--blockdev", "driver=file,node-name=f,filename=\(source)",
                                                      "--blockdev", "driver=raw,node-name=r,file=f",
                                                      "--nbd-server", "addr.type=unix,addr.path=\(scratch.file("nbd.sock"))",
                                                      "--export", "type=nbd,id=e,node-name=r,writable=on"], timeout: 20)
        XCTAssertNotEqual(qsd.status, 0)
        XCTAssertTrue(qsd.stderr.contains("lock"), qsd.stderr)
        XCTAssertEqual(mount.stop(), 0)
        // Unlocked again once the daemon is gone.
        XCTAssertEqual(try qemuIO(source, ["write -P 0x1 0 4k"]).status, 0)
    }

    func testMirrorfsRefusesImagesThatQEMUHolds() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20)
        let mnt = try scratch.directory("mnt")
        // qemu-io holding the image open for writing.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: try which("qemu-io"))
        holder.arguments = ["-f", "raw", "-c", "sleep 20000", source]
        try holder.run()
        defer { holder.terminate(); holder.waitUntilExit() }
        _ = waitUntil("qemu-io to lock the image") {
            (try? String(contentsOfFile: "/proc/locks", encoding: .utf8))?.contains(":\(try! fileStatus(source).st_ino) 101 101") ?? false
                || (try? String(contentsOfFile: "/proc/locks", encoding: .utf8))?.contains(":\(try! fileStatus(source).st_ino) 100 101") ?? false
        }
        assertOneLineError(try mirrorfs(["mount", source, mnt]), mentions: "in use by another process")
        XCTAssertFalse(isMounted(mnt))
        holder.terminate()
        holder.waitUntilExit()

        // qemu-storage-daemon exporting it writable.
        let pidFile = scratch.file("qsd.pid")
        try startDaemon("qemu-storage-daemon", [
            "--blockdev", "driver=file,node-name=f,filename=\(source)", "--blockdev", "driver=raw,node-name=r,file=f",
            "--nbd-server", "addr.type=unix,addr.path=\(scratch.file("nbd.sock"))",
            "--export", "type=nbd,id=e,node-name=r,writable=on", "--daemonize", "--pidfile", pidFile], log: scratch.file("qsd.log"))
        defer { if let pid = readPid(pidFile) { kill(pid, SIGTERM) } }
        assertOneLineError(try mirrorfs(["mount", source, mnt]), mentions: "in use by another process")
        // As a target too.
        let other = try scratch.image("other.raw", size: 16 << 20)
        assertOneLineError(try mirrorfs(["mount", other, mnt, "--target", source]), mentions: "in use by another process")
        XCTAssertFalse(isMounted(mnt))
    }

    // MARK: - 5. No target inside a mount

    func testTargetsInsideAnyMirrorfsMountAreRefusedAndTheDaemonStaysUsable() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        let otherSource = try scratch.image("other.raw", size: 8 << 20)
        let other = try Mount(source: otherSource, at: try scratch.directory("other"))
        for target in [mount.image, mount.mountpoint + "/new.raw", mount.mountpoint + "/.status/x.raw",
                       other.image, other.mountpoint + "/new.raw"] {
            for mode in ["background", "write-blocking"] {
                let result = try mirrorfs(["job", "start", mount.mountpoint, "--target", target, "--copy-mode", mode], timeout: 20)
                assertOneLineError(result, mentions: "mirrorfs mount")
            }
        }
        XCTAssertEqual(job(mount) == nil, true)
        // Before mounting: a target under the mountpoint.
        let mnt3 = try scratch.directory("mnt3")
        let third = try scratch.image("third.raw", size: 8 << 20)
        assertOneLineError(try mirrorfs(["mount", third, mnt3, "--target", mnt3 + "/t.raw"]), mentions: "under the mirrorfs mount")
        XCTAssertEqual(try qemuIO(mount.image, ["write -P 0x3 0 64k", "flush"]).status, 0)
        XCTAssertEqual(mount.stop(), 0)
        XCTAssertEqual(other.stop(), 0)
    }

    // MARK: - 6. A log that cannot be written never stops the daemon

    func testTheDaemonSurvivesAStderrThatCannotBeWritten() throws {
        for sink in ["/dev/full", "closed pipe"] {
            let scratch = try Scratch()
            let source = try scratch.image("disk.raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
            let mnt = try scratch.directory("mnt")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: mirrorfsBinary)
            process.arguments = ["mount", source, mnt, "--target", scratch.file("new.raw")]
            let pipe = Pipe()
            process.standardError = sink == "/dev/full" ? FileHandle(forWritingAtPath: "/dev/full") : pipe
            try process.run()
            if sink == "closed pipe" { try pipe.fileHandleForReading.close() }
            _ = waitUntil("the mount") { isMounted(mnt) }
            waitForJob(mnt, containing: #""ready": true"#)
            // Events and log lines: a mode change, a completion.
            XCTAssertEqual(try mirrorfs(["job", "change", mnt, "--copy-mode", "write-blocking"]).status, 0)
            XCTAssertEqual(try qemuIO(mnt + "/disk.raw", ["write -P 0x7 0 1M", "flush"]).status, 0)
            XCTAssertEqual(try mirrorfs(["job", "complete", mnt]).status, 0)
            XCTAssertTrue(process.isRunning, "\(sink): the daemon died")
            XCTAssertEqual(try qemuIO(mnt + "/disk.raw", ["read -P 0x7 0 1M"]).status, 0)
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
            XCTAssertEqual(process.terminationStatus, 0, sink)
            XCTAssertFalse(isMounted(mnt))
        }
        // The CLI itself: an error line into a full stderr is no trap.
        let result = try execute("/bin/sh", ["-c", "\(mirrorfsBinary) mount /nonexistent /tmp 2>/dev/full; echo $?"])
        XCTAssertEqual(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "1")
    }

    // MARK: - 7. Targets without fallocate get written zeroes

    func testZeroWritesReachTargetsWhoseFileSystemHasNoFallocate() throws {
        for fileSystem in ["ramfs", "tmpfs"] {
            let scratch = try Scratch()
            let dir = try self.fileSystem(fileSystem, in: scratch, named: "fs")
            let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 2 << 20), (8 << 20, 2 << 20)])
            let target = dir + "/new.raw"
            // Random data in the target where the source has holes: the copier must zero them.
            XCTAssertEqual(try execute("truncate", ["-s", "16M", target]).status, 0)
            XCTAssertEqual(try qemuIO(target, ["write -P 0xee 4M 2M"]).status, 0)
            let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                                  extra: ["--target", target, "--copy-mode", "write-blocking", "--state-dir", scratch.path])
            waitForJob(mount.mountpoint, containing: #""actively-synced": true"#)
            XCTAssertEqual(try execute("fallocate", ["-z", "-o", "1M", "-l", "512K", mount.image]).status, 0)
            XCTAssertEqual(try execute("fallocate", ["-p", "-o", "8M", "-l", "1M", mount.image]).status, 0)
            let json = waitForJob(mount.mountpoint, containing: #""actively-synced": true"#)
            XCTAssertTrue(json.contains(#""io-status": "ok""#), json)
            XCTAssertFalse(json.contains("error"), "\(fileSystem): \(json)")
            XCTAssertTrue(try identical(source, target), fileSystem)
            XCTAssertEqual(mount.stop(), 0)
        }
    }

    // MARK: - 8. Every start path is crash-safe, with one set of checks

    func testJobStartAndDriveMirrorKeepADirtyLogAndResumeAfterKillNine() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 8 << 20)])
        let target = scratch.file("new.raw")
        let mnt = try scratch.directory("mnt")
        let log = scratch.file("daemon.log")
        XCTAssertEqual(try mountDaemon([source, mnt], log: log).status, 0)
        let states = try scratch.directory("state")
        XCTAssertEqual(try mirrorfs(["job", "start", mnt, "--target", target, "--state-dir", states]).status, 0)
        let json = waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertTrue(json.contains(#""dirty-log": "\#(states)/new.raw-"#), json)
        XCTAssertEqual(try qemuIO(mnt + "/disk.raw", ["write -P 0x42 20M 1M", "flush"]).status, 0)
        killDaemon(mnt)
        XCTAssertEqual(try mountDaemon([source, mnt, "--target", target, "--state-dir", states], log: log).status, 0)
        try assertReadyWith("resumed from the dirty log", then: mnt, leaves: source, equalTo: target, "target and source differ")
    }

    func testTheCLIAndQMPRefuseABadTargetWithTheSameError() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20)
        let wrongSize = try scratch.image("small.raw", size: 4 << 20)
        let before = try sha256(wrongSize)
        let expected = "target '\(wrongSize)' has \(4 << 20) bytes but the source has \(8 << 20)"
        assertOneLineError(try mirrorfs(["mount", source, try scratch.directory("a"), "--target", wrongSize]), mentions: expected)
        let socket = scratch.file("qmp.sock")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--qmp", socket])
        assertOneLineError(try mirrorfs(["job", "start", mount.mountpoint, "--target", wrongSize]), mentions: expected)
        let script = """
            import asyncio, sys
            from qemu.qmp import QMPClient, ExecuteError
            async def main():
                c = QMPClient("t"); await c.connect(sys.argv[1])
                try:
                    await c.execute("drive-mirror", {"device": "disk.raw", "target": sys.argv[2], "sync": "full", "mode": "existing"})
                    print("accepted")
                except ExecuteError as e:
                    print("error:", e.error.error.desc)
                print("jobs:", await c.execute("query-block-jobs"))
                await c.disconnect()
            asyncio.run(main())
            """
        let out = try check(testPython, ["-c", script, socket, wrongSize])
        XCTAssertTrue(out.contains("error: " + expected), out)
        XCTAssertTrue(out.contains("jobs: []"), out)
        XCTAssertEqual(try sha256(wrongSize), before)
        XCTAssertEqual(mount.stop(), 0)
    }

    /// A failed job's log is not adopted by a job into a new file of the same name, and a
    /// log is not trusted once the image was written with no job since the mount began.
    func testNoLogVouchesForATargetItDoesNotDescribe() throws {
        let scratch = try Scratch()
        let (source, target, small, mnt, log, _) = try jobThatFillsItsTarget(scratch)
        // The operator deletes the partial target, frees space and starts again in place.
        XCTAssertEqual(unlink(target), 0)
        XCTAssertEqual(try execute("mount", ["-o", "remount,size=64M", small]).status, 0)
        XCTAssertEqual(try mirrorfs(["job", "start", mnt, "--target", target]).status, 0)
        let fresh = waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertFalse(fresh.contains("resumed"), fresh)
        XCTAssertTrue(FileManager.default.fileExists(atPath: target + ".dirtylog"), "the new job lost its log")
        try unmount(mnt)
        XCTAssertTrue(try identical(source, target), "a new target was filled from an old log")

        // kill -9, then served without a job while the VM writes, then a job again.
        XCTAssertEqual(try mountDaemon([source, mnt, "--target", target], log: log).status, 0)
        waitForJob(mnt, containing: #""ready": true"#)
        killDaemon(mnt)
        XCTAssertEqual(try mountDaemon([source, mnt], log: log).status, 0)
        XCTAssertEqual(try qemuIO(mnt + "/disk.raw", ["write -P 0x3c 2M 1M", "flush"]).status, 0)
        XCTAssertEqual(try mirrorfs(["job", "start", mnt, "--target", target]).status, 0)
        try assertReadyWith("written since it was mounted", then: mnt, leaves: source, equalTo: target, "writes made without a job were not copied")
    }

    /// The log of a sync-none job never stands in for the whole copy a sync-full job owes.
    func testASyncNoneLogIsNotResumedByAFullMirror() throws {
        let scratch = try Scratch()
        // Old data in the first 64 MiB region, the new write in the third.
        let source = try scratch.image("disk.raw", size: 192 << 20, randomPieces: [(0, 8 << 20)])
        let target = scratch.file("new.raw")  // created by the sync-none job: it holds none of the old data
        let mnt = try scratch.directory("mnt")
        let log = scratch.file("daemon.log")
        XCTAssertEqual(try mountDaemon([source, mnt, "--target", target, "--sync", "none"], log: log).status, 0)
        waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertEqual(try qemuIO(mnt + "/disk.raw", ["write -P 0x2f 130M 64k", "flush"]).status, 0)
        try unmount(mnt)
        XCTAssertEqual(try mountDaemon([source, mnt, "--target", target], log: log).status, 0)
        try assertReadyWith("sync-none job", then: mnt, leaves: source, equalTo: target, "a full mirror trusted a sync-none log")
    }

    /// Two targets of one file name under one --state-dir have logs of their own.
    func testTargetsOfOneNameShareAStateDirectoryWithoutSharingALog() throws {
        let scratch = try Scratch()
        let states = try scratch.directory("state")
        var logs: [String] = []
        for vm in ["a", "b"] {
            let source = try scratch.image("\(vm).raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
            let target = try scratch.directory("new-\(vm)") + "/disk.raw"
            let mount = try Mount(source: source, at: try scratch.directory("mnt-\(vm)"),
                                  extra: ["--target", target, "--state-dir", states])
            let json = waitForJob(mount.mountpoint, containing: #""ready": true"#)
            let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
            logs.append(try XCTUnwrap(object["dirty-log"] as? String))
            XCTAssertEqual(mount.stop(), 0)
        }
        XCTAssertNotEqual(logs[0], logs[1])
        XCTAssertTrue(logs.allSatisfy { FileManager.default.fileExists(atPath: $0) }, "\(logs)")
    }

    /// Started with stderr closed, the daemon logs nowhere — never into the image.
    func testADaemonStartedWithStderrClosedNeverLogsIntoTheImage() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20)
        let mnt = try scratch.directory("mnt")
        let target = scratch.file("new.raw")
        let shell = Process()
        shell.executableURL = URL(fileURLWithPath: "/bin/sh")
        shell.arguments = ["-c", "exec \(mirrorfsBinary) mount \(source) \(mnt) --target \(target) 2>&-"]
        try shell.run()
        _ = waitUntil("the mount") { isMounted(mnt) }
        waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertEqual(try mirrorfs(["job", "complete", mnt]).status, 0)
        kill(shell.processIdentifier, SIGTERM)
        shell.waitUntilExit()
        let head = try XCTUnwrap(FileHandle(forReadingAtPath: target)).readData(ofLength: 1 << 20)
        XCTAssertTrue(head.allSatisfy { $0 == 0 }, "log text in the image")
        let sourceHead = try XCTUnwrap(FileHandle(forReadingAtPath: source)).readData(ofLength: 1 << 20)
        XCTAssertTrue(sourceHead.allSatisfy { $0 == 0 }, "log text in the source")
    }

    // MARK: - Clean unmount records the images' state

    func testASourceChangedWhileUnservedMeansAFullCopyWithTheReason() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 4 << 20)])
        let target = scratch.file("new.raw")
        let mnt = try scratch.directory("mnt")
        let log = scratch.file("daemon.log")
        let command = [source, mnt, "--target", target]
        XCTAssertEqual(try mountDaemon(command, log: log).status, 0)
        waitForJob(mnt, containing: #""ready": true"#)
        try unmount(mnt)
        // Unchanged: the next mount resumes from the log.
        XCTAssertEqual(try mountDaemon(command, log: log).status, 0)
        let clean = waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertTrue(clean.contains("resumed from the dirty log after a clean unmount"), clean)
        try unmount(mnt)
        // Written directly while nobody served it.
        XCTAssertEqual(try qemuIO(source, ["write -P 0x99 30M 4k"]).status, 0)
        XCTAssertEqual(try mountDaemon(command, log: log).status, 0)
        let json = waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertTrue(json.contains(#""resync-reason": "the source changed while it was not served: full copy""#), json)
        XCTAssertTrue(json.contains(#""resync-bytes": \#(32 << 20)"#), json)
        try unmount(mnt)
        XCTAssertTrue(try identical(source, target))
    }

    // MARK: - Operator mistakes, at random

    func testRandomOperatorSequencesNeverLoseAnAcknowledgedWrite() throws {
        let steps = ProcessInfo.processInfo.environment["MIRRORFS_OPERATOR_STEPS"] ?? "40"
        let (status, output) = try runTool("tools/operator-test", [steps, "1"])
        XCTAssertEqual(status, 0, output)
        print(output.split(separator: "\n").suffix(3).joined(separator: "\n"))
    }
}

/// The QMP server under connection churn: clients connect and drop at a high rate, many at
/// once, some in the middle of a command; every command still gets its own reply.
final class QMPChurnTests: XCTestCase {
    func testEveryCommandGetsItsReplyOnItsOwnConnectionUnderChurn() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20)
        let socket = scratch.file("qmp.sock")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--qmp", socket])
        let script = """
            import json, random, socket, sys, threading
            path = sys.argv[1]
            errors = []
            def lines(s):
                buf = b""
                while True:
                    while b"\\n" not in buf:
                        data = s.recv(65536)
                        if not data:
                            raise EOFError("closed")
                        buf += data
                    line, buf = buf.split(b"\\n", 1)
                    yield json.loads(line)
            def reply(it):
                for msg in it:
                    if "event" not in msg:
                        return msg
            def worker(n):
                rnd = random.Random(n)
                for i in range(60):
                    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(path)
                    try:
                        it = lines(s)
                        next(it)
                        s.sendall(json.dumps({"execute": "qmp_capabilities", "id": f"c{n}-{i}"}).encode() + b"\\n")
                        r = reply(it)
                        if r.get("id") != f"c{n}-{i}" or "return" not in r:
                            errors.append(("caps", n, i, r))
                        if rnd.random() < 0.3:
                            s.sendall(b'{"execute": "query-block-jobs", "id": "dropped"}')   # half a line, then gone
                            continue
                        for k in range(3):
                            want = f"q{n}-{i}-{k}"
                            s.sendall(json.dumps({"execute": rnd.choice(["query-block-jobs", "query-version", "query-jobs"]), "id": want}).encode() + b"\\n")
                            r = reply(it)
                            if r.get("id") != want or "return" not in r:
                                errors.append(("reply", n, i, k, r))
                    except Exception as e:
                        errors.append(("exception", n, i, repr(e)))
                    finally:
                        s.close()
            threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
            for t in threads: t.start()
            for t in threads: t.join()
            print("errors:", len(errors), errors[:5])
            """
        let out = try check(testPython, ["-c", script, socket], timeout: 120)
        XCTAssertTrue(out.contains("errors: 0 "), out)
        // Still serving, and a normal client still works.
        XCTAssertEqual(try execute(mirrorfsBinary, ["status", mount.mountpoint, "--json"]).stdout, "null\n")
        XCTAssertEqual(mount.stop(), 0)
    }
}

/// Numbers at their extremes, on the command line and over QMP: accepted in range or
/// refused with one line; the daemon never traps.
final class NumericExtremesTests: XCTestCase {
    func testSizesSpeedsAndTimeoutsAtTheirExtremesAreAcceptedOrRefusedInOneLine() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
        let mnt = try scratch.directory("mnt")
        let target = scratch.file("t.raw")
        for extra in [["--granularity", "9223372036854775807"], ["--granularity", "0"], ["--buf-size", "0"],
                      ["--speed", "99999999999999999999"], ["--speed", "8796093022208G"], ["--buf-size", "-1"],
                      ["--nbd-timeout", "nan"], ["--nbd-timeout", "inf"], ["--nbd-timeout", "-1"],
                      ["--granularity", "１２"]] {
            let result = try execute(mirrorfsBinary, ["mount", source, mnt, "--target", target] + extra, timeout: 20)
            XCTAssertNotEqual(result.status, 0, "\(extra)")
            XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, "\(extra): \(result.stderr)")
            XCTAssertTrue(result.stderr.hasPrefix("mirrorfs: error: "), "\(extra): \(result.stderr)")
            XCTAssertFalse(isMounted(mnt))
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: target))
        let socket = scratch.file("qmp.sock")
        let mount = try Mount(source: source, at: mnt, extra: ["--qmp", socket, "--target", target,
                                                                "--speed", "8589934591G", "--buf-size", "8589934591G"])
        waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertEqual(try execute(mirrorfsBinary, ["job", "set-speed", mnt, "9223372036854775807"]).status, 0)
        let tooBig = try execute(mirrorfsBinary, ["job", "set-speed", mnt, "18446744073709551615"])
        XCTAssertNotEqual(tooBig.status, 0)
        XCTAssertEqual(tooBig.stderr.split(separator: "\n").count, 1, tooBig.stderr)
        let script = """
            import json, socket, sys
            s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
            f = s.makefile("rwb")
            def call(text):
                f.write(text.encode() + b"\\n"); f.flush()
                while True:
                    m = json.loads(f.readline())
                    if "event" not in m:
                        return m
            f.readline()
            call('{"execute": "qmp_capabilities"}')
            for args in ['"speed": -9223372036854775808', '"speed": 100000000000000000000000', '"speed": 1e308',
                         '"granularity": 4611686018427387904', '"granularity": -1', '"buf-size": -1']:
                r = call('{"execute": "block-job-set-speed", "arguments": {"device": "disk.raw", %s}}' % args
                         if args.startswith('"speed"') else
                         '{"execute": "drive-mirror", "arguments": {"device": "disk.raw", "target": "/nonexistent/x", "sync": "full", %s}}' % args)
                print(args, "->", "error" if "error" in r else "ACCEPTED", r.get("error", {}).get("desc", ""))
            print("alive:", "return" in call('{"execute": "query-block-jobs"}'))
            """
        let out = try check(testPython, ["-c", script, socket])
        XCTAssertFalse(out.contains("ACCEPTED"), out)
        XCTAssertTrue(out.contains("alive: True"), out)
        XCTAssertEqual(mount.stop(), 0)
    }
}

/// Commands that end a job early, or cannot end it now, say so.
final class OperatorMessageTests: XCTestCase {
    func testUnmountCancelAndCompleteOfAnUnfinishedJobSayWhatIsLeftAndWhy() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 64 << 20)])
        let target = scratch.file("new.raw")
        let mnt = try scratch.directory("mnt")
        let log = scratch.file("daemon.log")
        let slow = ["mount", source, mnt, "--target", target, "--speed", "1M", "--daemonize", "--log-file", log]
        try check(mirrorfsBinary, slow)
        let unmounted = try check(mirrorfsBinary, ["unmount", mnt])
        XCTAssertTrue(unmounted.contains("is a partial copy"), unmounted)
        XCTAssertTrue(unmounted.contains("\(target).dirtylog' is kept"), unmounted)
        _ = waitUntil("the daemon to exit") { !isMounted(mnt) }

        try check(mirrorfsBinary, slow)
        try check(mirrorfsBinary, ["job", "pause", mnt])
        _ = waitUntil("the pause") { waitForJob(mnt, containing: #""paused": true"#, timeout: 1).contains(#""paused": true"#) }
        let paused = try execute(mirrorfsBinary, ["job", "complete", mnt], timeout: 20)
        XCTAssertNotEqual(paused.status, 0)
        XCTAssertTrue(paused.stderr.contains("the job is paused") && paused.stderr.contains("job resume"), paused.stderr)
        try check(mirrorfsBinary, ["job", "resume", mnt])
        let cancelled = try check(mirrorfsBinary, ["job", "cancel", mnt])
        XCTAssertTrue(cancelled.contains("partial copy"), cancelled)
        XCTAssertFalse(FileManager.default.fileExists(atPath: target + ".dirtylog"), "cancel discards the log")
        try check(mirrorfsBinary, ["unmount", mnt])
    }
}

/// The CLI never waits on a daemon without a deadline.
final class ControlDeadlineTests: XCTestCase {
    func testCommandsAgainstAStoppedDaemonEndWithinTheirDeadlineInOneLine() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 8 << 20)
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        let server = mount.serverPID
        kill(server, SIGSTOP)
        defer { kill(server, SIGCONT) }
        let started = Date()
        let result = try execute(mirrorfsBinary, ["status", mount.mountpoint, "--json"], timeout: 90)
        let took = Date().timeIntervalSince(started)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, result.stderr)
        XCTAssertTrue(result.stderr.contains("does not answer"), result.stderr)
        XCTAssertLessThan(took, 60, "the CLI waited past its deadline")
        kill(server, SIGCONT)
        XCTAssertEqual(mount.stop(), 0)
    }
}

/// A mount that does not come up leaves nothing behind: not the target its job created,
/// not the job's log.
final class FailedMountTests: XCTestCase {
    func testAMountThatFailsRemovesTheTargetItsJobCreated() throws {
        let conf = (try? String(contentsOfFile: "/etc/fuse.conf", encoding: .utf8)) ?? ""
        let allowed = conf.split(separator: "\n").contains { $0.trimmingCharacters(in: .whitespaces) == "user_allow_other" }
        let scratch = try Scratch()
        XCTAssertEqual(chmod(scratch.path, 0o777), 0)
        let source = try scratch.image("disk.raw", size: 8 << 20, randomPieces: [(0, 1 << 20)])
        XCTAssertEqual(chown(source, 65534, 65534), 0)
        let mnt = try scratch.directory("mnt")
        XCTAssertEqual(chown(mnt, 65534, 65534), 0)
        let run = try scratch.directory("run")
        XCTAssertEqual(chown(run, 65534, 65534), 0)
        let target = scratch.file("new.raw")
        // As a user, --allow-other needs user_allow_other in /etc/fuse.conf: the mount fails.
        let result = try execute("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", mirrorfsBinary, "mount",
                                             source, mnt, "--target", target, "--allow-other", "--qmp", run + "/q.sock",
                                             "--daemonize", "--log-file", run + "/log"],
                                 timeout: 30)
        if allowed {
            XCTAssertEqual(result.status, 0, "with user_allow_other the mount works: \(result.stderr)")
            _ = try? execute(mirrorfsBinary, ["unmount", mnt])
            return
        }
        XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, result.stderr)
        XCTAssertNotEqual(result.status, 0, result.stderr)
        XCTAssertFalse(isMounted(mnt))
        XCTAssertFalse(FileManager.default.fileExists(atPath: target), "the failed mount left its target")
        XCTAssertFalse(FileManager.default.fileExists(atPath: target + ".dirtylog"), "the failed mount left its log")
    }
}
