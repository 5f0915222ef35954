import CLinux
import Foundation
import XCTest

/// The mirror job through a real mount: `mount --target`, clients writing through the
/// mount, the CLI driving the job, and the target file checked directly.
final class MirrorMountTests: XCTestCase {
    func testBackgroundMirrorOfAHalfSparseGigabyteReachesReadyIdenticalAndSparse() throws {
        let scratch = try Scratch()
        // Random data in every other MiB, holes between.
        let pieces = (0..<512).map { (UInt64($0) * 2 << 20, 1 << 20) }
        let source = try scratch.image("disk.raw", size: 1 << 30, randomPieces: pieces)
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", target])
        waitUntil("ready") { job(mount)?["status"] as? String == "ready" }
        XCTAssertEqual(job(mount)?["actively-synced"] as? Bool, false, "background mode is never actively synced")
        XCTAssertEqual(events(mount).prefix(4), ["JSC created", "JSC running", "JSC ready", "BLOCK_JOB_READY"])
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
        XCTAssertEqual(compare.status, 0, compare.stdout + compare.stderr)
        let sourceBlocks = try allocatedBytes(source), targetBlocks = try allocatedBytes(target)
        XCTAssertLessThanOrEqual(abs(targetBlocks - sourceBlocks), sourceBlocks / 20,
                                 "target allocates \(targetBlocks) bytes, source \(sourceBlocks)")
        XCTAssertEqual(mount.stop(), 0)
    }

    func testSwitchToWriteBlockingUnderFourWritersThenEveryReturnedWriteIsInTheTarget() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 256 << 20, randomPieces: [(0, 64 << 20)])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", target])
        // Ready first: four saturating writers over 128 MiB re-dirty chunks faster than a
        // background copier cleans them, so a job that is not ready before they start may
        // never be (as in QEMU; write-blocking is the remedy this test switches to).
        waitUntil("ready") { job(mount)?["ready"] as? Bool == true }
        // Four writers over the first half, for the rest of the test.
        let fio = try startWriters(mount.image, size: "128M", runtime: 60)
        defer { if fio.isRunning { fio.terminate() }; fio.waitUntilExit() }
        usleep(300_000)
        XCTAssertEqual(job(mount)?["actively-synced"] as? Bool, false, "background mode with writers")
        try check(mirrorfsBinary, ["job", "change", mount.mountpoint, "--copy-mode", "write-blocking"])
        waitUntil("actively-synced", timeout: 30) { job(mount)?["actively-synced"] as? Bool == true }
        XCTAssertTrue(fio.isRunning, "the writers still run")
        XCTAssertEqual(job(mount)?["copy-mode"] as? String, "write-blocking")
        // From now on a write that returned is in the target file at once.
        let fd = open(mount.image, O_RDWR | CLINUX_O_DIRECT)
        let targetFD = open(target, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertGreaterThanOrEqual(targetFD, 0)
        defer { close(fd); close(targetFD) }
        var buffer: UnsafeMutableRawPointer?
        posix_memalign(&buffer, 4096, 65536)
        defer { free(buffer) }
        for round in 0..<50 {
            let offset = off_t(192 << 20) + off_t(round) * 65536
            memset(buffer!, Int32(round + 1), 65536)
            XCTAssertEqual(pwrite(fd, buffer!, 65536, offset), 65536)
            var back = [UInt8](repeating: 0, count: 65536)
            XCTAssertEqual(pread(targetFD, &back, 65536, offset), 65536)
            XCTAssertEqual(back, [UInt8](repeating: UInt8(round + 1), count: 65536), "round \(round)")
        }
        fio.terminate()
        fio.waitUntilExit()
        try completeStopAndCompare(mount, source: source, target: target)
    }

    func testCompletePivotsTheMountOntoTheTarget() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 8 << 20)])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", target, "--copy-mode", "write-blocking"])
        waitUntil("ready") { job(mount)?["status"] as? String == "ready" }
        try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
        XCTAssertEqual(Array(events(mount).suffix(5)), ["JSC waiting", "JSC pending", "BLOCK_JOB_COMPLETED", "JSC concluded", "JSC null"])
        XCTAssertNil(job(mount))
        let sourceSum = try sha256(source)
        try check("qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x3c 1M 2M", mount.image])
        XCTAssertEqual(try sha256(source), sourceSum, "the source is no longer touched")
        try check("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x3c 1M 2M", target])
        try check("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x3c 1M 2M", mount.image])
        XCTAssertEqual(mount.stop(), 0)
    }

    func testCancelAfterReadyKeepsTheSourceAndLeavesAConsistentTarget() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 8 << 20)])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", target])
        waitUntil("ready") { job(mount)?["status"] as? String == "ready" }
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x5e 3M 1M", mount.image])
        try check(mirrorfsBinary, ["job", "cancel", mount.mountpoint])
        XCTAssertTrue(events(mount).contains("BLOCK_JOB_COMPLETED"))
        XCTAssertFalse(events(mount).contains("BLOCK_JOB_CANCELLED"))
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
        XCTAssertEqual(compare.status, 0, "target == source as of the cancel")
        // The mount still serves the source.
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x6f 0 4k", mount.image])
        try check("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x6f 0 4k", source])
        XCTAssertEqual(mount.stop(), 0)
    }

    func testCancelBeforeReadyEmitsCancelled() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 64 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", scratch.file("target.raw"), "--speed", "1M"])
        waitUntil("running") { job(mount)?["status"] as? String == "running" }
        try check(mirrorfsBinary, ["job", "cancel", mount.mountpoint])
        XCTAssertEqual(Array(events(mount).suffix(4)), ["JSC aborting", "BLOCK_JOB_CANCELLED", "JSC concluded", "JSC null"])
        XCTAssertEqual(mount.stop(), 0)
    }

    func testPauseHoldsTheOffsetAndSetSpeedLimitsTheRate() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 64 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", scratch.file("target.raw"), "--speed", "4M"])
        waitUntil("running") { (job(mount)?["offset"] as? Int ?? 0) > 0 }
        try check(mirrorfsBinary, ["job", "pause", mount.mountpoint])
        waitUntil("paused") { job(mount)?["status"] as? String == "paused" }
        let pausedAt = job(mount)?["offset"] as? Int
        usleep(1_000_000)
        XCTAssertEqual(job(mount)?["offset"] as? Int, pausedAt, "offset moves while paused")
        XCTAssertEqual(job(mount)?["paused"] as? Bool, true)
        try check(mirrorfsBinary, ["job", "resume", mount.mountpoint])
        waitUntil("running again") { job(mount)?["status"] as? String == "running" }
        // Rate over 3 s at the 4 MiB/s limit, then at 8 MiB/s.
        for limit in [4 << 20, 8 << 20] {
            try check(mirrorfsBinary, ["job", "set-speed", mount.mountpoint, String(limit)])
            usleep(300_000)
            let start = (Date(), job(mount)?["offset"] as? Int ?? 0)
            usleep(3_000_000)
            let end = (Date(), job(mount)?["offset"] as? Int ?? 0)
            let rate = Double(end.1 - start.1) / end.0.timeIntervalSince(start.0)
            // Never faster than the limit (one 100 ms slice of burst, one copy at each edge of
            // the window); slower only as far as a loaded machine makes it. The limiter's
            // arithmetic is tested exactly in MirrorStateTests with a manual clock.
            XCTAssertLessThanOrEqual(rate, Double(limit) * 1.2, "limit \(limit): measured \(Int(rate)) B/s")
            XCTAssertGreaterThanOrEqual(rate, Double(limit) * 0.5, "limit \(limit): measured \(Int(rate)) B/s")
        }
        try check(mirrorfsBinary, ["job", "cancel", mount.mountpoint, "--force"])
        XCTAssertEqual(mount.stop(), 0)
    }

    /// A target on a small tmpfs fills up.
    func testStatfsShowsTheFileSystemOfTheImageServedBeforeAndAfterThePivot() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20, randomPieces: [(0, 4 << 20)])
        let targetFS = try scratch.directory("targetfs")
        try check("mount", ["-t", "tmpfs", "-o", "size=40m", "tmpfs", targetFS])
        defer { _ = try? execute("umount", ["-l", targetFS]) }
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", targetFS + "/target.raw"])
        func space(_ path: String) throws -> (blocks: UInt64, fragment: UInt64) {
            var st = statvfs()
            guard statvfs(path, &st) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno)!) }
            return (UInt64(st.f_blocks), UInt64(st.f_frsize))
        }
        let sourceFS = try space(scratch.path), tmpfs = try space(targetFS)
        XCTAssertNotEqual(sourceFS.blocks * sourceFS.fragment, tmpfs.blocks * tmpfs.fragment)
        let before = try space(mount.mountpoint)
        XCTAssertEqual(before.blocks * before.fragment, sourceFS.blocks * sourceFS.fragment, "df shows the source's file system")
        waitUntil("ready") { job(mount)?["status"] as? String == "ready" }
        try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
        let after = try space(mount.mountpoint)
        XCTAssertEqual(after.blocks * after.fragment, tmpfs.blocks * tmpfs.fragment, "after the pivot, df shows the target's file system")
        XCTAssertEqual(mount.stop(), 0)
    }

    func testFullTargetStopsWithNospaceUntilResumedAndReportFailsTheJobOnly() throws {
        for policy in ["stop", "report"] {
            let scratch = try Scratch()
            let source = try scratch.image("disk.raw", size: 48 << 20, randomPieces: [(0, 48 << 20)])
            let small = try scratch.directory("small")
            try check("mount", ["-t", "tmpfs", "-o", "size=16m", "tmpfs", small])
            defer { _ = try? execute("umount", ["-l", small]) }
            let target = small + "/target.raw"
            let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                                  extra: ["--target", target, "--on-target-error", policy])
            if policy == "stop" {
                waitUntil("nospace stop") { job(mount)?["io-status"] as? String == "nospace" }
                waitUntil("paused") { job(mount)?["status"] as? String == "paused" }
                XCTAssertTrue(events(mount).contains("BLOCK_JOB_ERROR"))
                // The image's user sees no error.
                try check("qemu-io", ["-f", "raw", "-c", "write -P 0x42 0 1M", mount.image])
                try check("mount", ["-o", "remount,size=128m", small])
                try check(mirrorfsBinary, ["job", "resume", mount.mountpoint])
                waitUntil("ready") { job(mount)?["status"] as? String == "ready" }
                try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
                XCTAssertEqual(mount.stop(), 0)
                let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
                XCTAssertEqual(compare.status, 0, compare.stdout)
            } else {
                waitUntil("job gone") { job(mount) == nil && events(mount).contains("JSC null") }
                let log = try String(contentsOfFile: mount.mountpoint + "/.status/events.jsonl", encoding: .utf8)
                XCTAssertTrue(log.contains("\"error\": \"No space left on device\""), log)
                try check("qemu-io", ["-f", "raw", "-c", "write -P 0x43 0 1M", mount.image])
                try check("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x43 0 1M", source])
                XCTAssertEqual(mount.stop(), 0)
            }
        }
    }

    func testMountRefusesBadTargetsAndJobOptionsBeforeMounting() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 4 << 20, randomPieces: [(0, 4 << 20)])
        let mnt = try scratch.directory("mnt")
        let wrongSize = try scratch.image("small.raw", size: 1 << 20, randomPieces: [(0, 4096)])
        XCTAssertEqual(symlink(source, scratch.file("link.raw")), 0)
        let before = try sha256(source), wrongBefore = try sha256(wrongSize)
        let cases: [([String], String)] = [
            (["--target", source], "is the source image itself"),
            (["--target", scratch.file("link.raw")], "is the source image itself"),
            (["--target", wrongSize], "has 1048576 bytes but the source has 4194304"),
            (["--target", scratch.file("nodir/t.raw")], "cannot be created"),
            (["--target", scratch.file("t.raw"), "--granularity", "1000"], "Parameter 'granularity' expects a power of 2"),
            (["--target", scratch.file("t.raw"), "--granularity", "128M"], "expects a value in range [512B, 64MB]"),
            (["--target", scratch.file("t.raw"), "--speed", "12Q"], "--speed"),
            (["--target", scratch.file("t.raw"), "--copy-mode", "sideways"], "--copy-mode"),
            (["--target", scratch.file("t.raw"), "--on-target-error", "panic"], "--on-target-error"),
            (["--copy-mode", "write-blocking"], "job options need --target"),
        ]
        for (extra, expected) in cases {
            let result = try execute(mirrorfsBinary, ["mount", source, mnt] + extra, timeout: 20)
            XCTAssertNotEqual(result.status, 0, "\(extra)")
            XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, "\(extra): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains(expected), "\(extra): \(result.stderr)")
            XCTAssertFalse(isMounted(mnt))
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: scratch.file("t.raw")), "no target created on refusal")
        XCTAssertEqual(try sha256(source), before)
        XCTAssertEqual(try sha256(wrongSize), wrongBefore)
        // A target the user may not write (as nobody).
        XCTAssertEqual(chmod(scratch.path, 0o755), 0)
        let readOnlyTarget = try scratch.image("ro.raw", size: 4 << 20)
        XCTAssertEqual(chmod(readOnlyTarget, 0o444), 0)
        XCTAssertEqual(chmod(source, 0o666), 0)
        let userMnt = try scratch.directory("usermnt")
        let userRun = try scratch.directory("userrun")
        XCTAssertEqual(chown(userMnt, 65534, 65534), 0)
        XCTAssertEqual(chown(userRun, 65534, 65534), 0)
        let result = try execute("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", mirrorfsBinary, "mount",
                                             source, userMnt, "--target", readOnlyTarget, "--qmp", userRun + "/u.qmp"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("is not writable"), result.stderr)
    }
}
