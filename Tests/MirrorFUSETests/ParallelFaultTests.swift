import Foundation
import XCTest

/// Parallel write-blocking under faults (SPEC 10): a target that fails some writes and a
/// source that runs out of space lose no write and never show a false actively-synced.
final class ParallelFaultTests: XCTestCase {
    private let pythonTests = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("python").path

    /// 1 % of the target's writes fail (nbdkit's error filter on a file, on-target-error
    /// ignore): each write that returned while actively-synced is true is in the target
    /// file when read right after; after complete the images are identical.
    func testWritesReturnedWhileActivelySyncedAreInTheTargetDespiteTargetErrors() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 8 << 20)])
        let target = try scratch.image("target.raw", size: 32 << 20)
        let server = try UnixNBDServer("nbdkit", in: scratch.path, name: "errors",
                                       ["--filter=error", "file", "file=\(target)", "error-pwrite=EIO", "error-pwrite-rate=1%"])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", server.uri, "--copy-mode", "write-blocking", "--on-target-error", "ignore"])
        waitUntil("actively synced") { job(mount)?["actively-synced"] as? Bool == true }
        let run = try execute(testPython, [pythonTests + "/synced_writes.py", mount.image, target, mount.mountpoint, "3000", "7"],
                              timeout: 300)
        XCTAssertEqual(run.status, 0, run.stdout + run.stderr)
        let checked = run.stdout.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? 0
        XCTAssertGreaterThan(checked, 100, "writes return while actively synced: \(run.stdout)")
        XCTAssertTrue(eventObjects(mount).contains { $0["event"] as? String == "BLOCK_JOB_ERROR" },
                      "the target failed some writes")
        waitUntil("actively synced again") { job(mount)?["actively-synced"] as? Bool == true }
        try check(mirrorfsBinary, ["job", "complete", mount.mountpoint])
        XCTAssertEqual(mount.stop(), 0)
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
        XCTAssertEqual(compare.status, 0, compare.stdout)
    }

    /// A source on a nearly full file system: writes into its holes fail with ENOSPC (the
    /// user sees it), the target part that went out in parallel is re-dirtied, and whenever
    /// the job says actively-synced the target equals the source; once space is free again
    /// the job completes identical.
    func testASourceThatRunsOutOfSpaceNeverLeavesAFalseActivelySynced() throws {
        let scratch = try Scratch()
        let small = try scratch.directory("small")
        try check("mount", ["-t", "tmpfs", "-o", "size=24m", "tmpfs", small])
        defer { _ = try? execute("umount", ["-l", small]) }
        let source = small + "/disk.raw"
        try check("truncate", ["-s", "64M", source])
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 4M", source])
        let filler = small + "/filler"
        _ = try? execute("dd", ["if=/dev/zero", "of=\(filler)", "bs=1M", "count=18"])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", target, "--copy-mode", "write-blocking"])
        waitUntil("actively synced") { job(mount)?["actively-synced"] as? Bool == true }
        var failed = 0, compared = 0
        for index in 0..<12 {
            let offset = (8 + index * 4) << 20
            let write = try execute("qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x\(String(0x20 + index, radix: 16)) \(offset) 1M", mount.image])
            if write.stdout.contains("No space left") || write.stderr.contains("No space left") { failed += 1 }
            // The range a failed write re-dirtied is copied again before actively-synced returns.
            if waitUntil("actively synced after the write at \(offset)", timeout: 20, { job(mount)?["actively-synced"] as? Bool == true }) {
                compared += 1
                let same = try execute("cmp", ["-n", "\(1 << 20)", "-i", "\(offset):\(offset)", source, target])
                XCTAssertEqual(same.status, 0, "actively synced, yet the target differs at \(offset): \(same.stdout)")
            }
        }
        XCTAssertGreaterThan(failed, 0, "the source ran out of space")
        XCTAssertEqual(compared, 12, "the job was actively synced again after every write, failed ones too")
        print("ENOSPC writes: \(failed) of 12; compared while actively synced: \(compared)")
        try FileManager.default.removeItem(atPath: filler)
        try check("qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x55 40M 1M", mount.image])
        waitUntil("actively synced") { job(mount)?["actively-synced"] as? Bool == true }
        try completeStopAndCompare(mount, source: source, target: target)
    }

    /// A file target on a file system that fills up while O_DIRECT writes go to it in
    /// parallel with the source (the kernel's asynchronous write): the user sees no error,
    /// the job stops with io-status nospace and is not actively synced; once there is room
    /// and it resumes, it is synced again and completes identical.
    func testAFullTargetUnderParallelWritesStopsTheJobNotTheUser() throws {
        try fullTarget(copyMode: "write-blocking")
    }

    /// The same in background mode after ready, where the writes go through to the target
    /// without the reply waiting for them.
    func testAFullTargetUnderBackgroundWritesThroughStopsTheJobNotTheUser() throws {
        try fullTarget(copyMode: "background")
    }

    private func fullTarget(copyMode: String) throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 48 << 20)
        let small = try scratch.directory("small")
        try check("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", small])
        defer { _ = try? execute("umount", ["-l", small]) }
        let target = small + "/target.raw"
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", target, "--copy-mode", copyMode, "--on-target-error", "stop"])
        waitUntil("ready") { job(mount)?["ready"] as? Bool == true }
        // 16 MiB of data in 1 MiB O_DIRECT writes: the target holds 8.
        let writes = (0..<16).flatMap { ["-c", "write -P 0x66 \($0)M 1M"] }
        let write = try execute("qemu-io", ["-f", "raw", "-t", "none"] + writes + [mount.image])
        XCTAssertEqual(write.status, 0, write.stdout + write.stderr)
        XCTAssertFalse(write.stdout.contains("error") || write.stderr.contains("error"), write.stdout + write.stderr)
        waitUntil("nospace stop") { job(mount)?["io-status"] as? String == "nospace" }
        XCTAssertEqual(job(mount)?["actively-synced"] as? Bool, false)
        XCTAssertTrue(eventObjects(mount).contains { $0["event"] as? String == "BLOCK_JOB_ERROR" })
        try check("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x66 0 16M", source])
        try check("mount", ["-o", "remount,size=128m", small])
        try check(mirrorfsBinary, ["job", "resume", mount.mountpoint])
        waitUntil("clean after the resume") { job(mount)?["ready"] as? Bool == true && job(mount)?["dirty-bytes"] as? Int == 0 }
        if copyMode == "write-blocking" {
            waitUntil("actively synced after the resume") { job(mount)?["actively-synced"] as? Bool == true }
        }
        try completeStopAndCompare(mount, source: source, target: target)
    }

    private func eventObjects(_ mount: Mount) -> [[String: Any]] {
        let text = (try? String(contentsOfFile: mount.mountpoint + "/.status/events.jsonl", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] }
    }
}
