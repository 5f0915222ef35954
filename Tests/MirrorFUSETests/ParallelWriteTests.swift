import Foundation
import XCTest

/// SPEC 10: write-blocking writes the source and the target at the same time; nothing a
/// client wrote and read back may differ, and the pivot leaves identical images.
final class ParallelWriteTests: XCTestCase {
    /// fio writes with crc32c verification (4 jobs, O_DIRECT, each its own 16 MiB) through
    /// an actively synced write-blocking mount, reads everything back and checks it; then
    /// the job completes and the images are identical.
    func testVerifiedWritesUnderWriteBlockingThenCompleteIdentical() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 128 << 20, randomPieces: [(0, 32 << 20)])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", target, "--copy-mode", "write-blocking"])
        XCTAssertTrue(waitUntil("actively-synced", timeout: 60) { job(mount)?["actively-synced"] as? Bool == true })
        let result = try execute("fio", [
            "--name=verify", "--filename=\(mount.image)", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=psync",
            "--numjobs=4", "--size=16M", "--offset_increment=16M", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--verify_state_save=0", "--group_reporting",
        ])
        XCTAssertEqual(result.status, 0, result.stdout + result.stderr)
        XCTAssertEqual(job(mount)?["actively-synced"] as? Bool, true)
        XCTAssertEqual(job(mount)?["io-status"] as? String, "ok")
        try completeStopAndCompare(mount, source: source, target: target)
    }

    /// Background mode after ready writes each O_DIRECT write through to the target from its
    /// own data (SPEC 4: the copier catches up) instead of dirtying a 64 KiB chunk for the
    /// copier to read and write whole: fio's verified 4 KiB writes (4 jobs, 4 in flight
    /// each, so writes meet in one chunk) add a small multiple of what they wrote to the
    /// job's progress, not 16 times it; then complete, identical.
    func testBackgroundWritesAfterReadyGoThroughToTheTargetAndCompleteIdentical() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 128 << 20, randomPieces: [(0, 32 << 20)])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--target", target])
        XCTAssertTrue(waitUntil("ready", timeout: 60) { job(mount)?["ready"] as? Bool == true })
        let before = job(mount)?["offset"] as? Int ?? 0
        let result = try execute("fio", [
            "--name=verify", "--filename=\(mount.image)", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio",
            "--iodepth=4", "--numjobs=4", "--size=16M", "--offset_increment=16M", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--verify_state_save=0", "--group_reporting",
        ])
        XCTAssertEqual(result.status, 0, result.stdout + result.stderr)
        XCTAssertTrue(waitUntil("clean again") { job(mount)?["dirty-bytes"] as? Int == 0 })
        // 64 MiB written (each fio job writes its 16 MiB once, verify headers included).
        let copied = (job(mount)?["offset"] as? Int ?? 0) - before
        print("background after ready: \(copied) bytes reached the target for 64 MiB written")
        XCTAssertGreaterThanOrEqual(copied, 64 << 20, "every write reached the target")
        // Whole chunks would be 16 times it; a write into a chunk another write-through still
        // holds is left to the copier (whole chunk): with 4 in flight per job, a few are.
        XCTAssertLessThan(copied, 4 * (64 << 20), "the writes went through as written, not as whole chunks: \(copied) bytes")
        XCTAssertEqual(job(mount)?["io-status"] as? String, "ok")
        try completeStopAndCompare(mount, source: source, target: target)
    }
}
