import Foundation
import XCTest

/// The dirty log through real crashes: `kill -9` of the daemon under load, restart, compare.
final class CrashTests: XCTestCase {
    /// 10 trials per copy mode (tools/crash-test runs any number).
    func testKillNineUnderFourWritersThenRestartResyncsOnlyLoggedRegions() throws {
        let trials = ProcessInfo.processInfo.environment["MIRRORFS_CRASH_TRIALS"] ?? "10"
        let (status, output) = try runTool("tools/crash-test", [trials, "both"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("trials identical with resync within the log"), output)
        print(output)
    }

    /// After the sweeps have cleared the regions the initial copy finished, a crash resyncs
    /// only the region written since: one 64 MiB region of a 512 MiB image.
    func testResumeCopiesOnlyTheRegionsWrittenSinceTheLastSweeps() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 512 << 20, randomPieces: [(0, 64 << 20)])
        let target = scratch.file("target.raw")
        let mnt = try scratch.directory("mnt")
        var mount: Mount? = try Mount(source: source, at: mnt, extra: ["--target", target])
        waitForJob(mnt, containing: #""ready": true"#)
        // Two whole sweep intervals (5 s each) without writes clear every region.
        XCTAssertTrue(waitForCleanLog(target + ".dirtylog"), "the sweeps never cleared the log")
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x21 300M 1M", mount!.image])
        mount!.stop(signal: SIGKILL)
        mount = nil
        let restarted = try Mount(source: source, at: mnt, extra: ["--target", target])
        let json = waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertTrue(json.contains(#""resync-bytes": \#(64 << 20)"#), json)
        XCTAssertEqual(restarted.stop(), 0)
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
        XCTAssertEqual(compare.status, 0)
    }

    /// Waits until the dirty log at `path` marks no region; false after `timeout`.
    private func waitForCleanLog(_ path: String, timeout: TimeInterval = 40) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        repeat {
            if let data = FileManager.default.contents(atPath: path), data.count > 4096,  // the header; one bit per region follows
               data[4096...].allSatisfy({ $0 == 0 }) { return true }
            usleep(200_000)
        } while Date() < deadline
        return false
    }

    /// A log that cannot vouch for the target (corrupted here) means a full resync.
    func testCorruptLogAfterACrashLeadsToAFullResync() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 32 << 20)])
        let target = scratch.file("target.raw")
        let mnt = try scratch.directory("mnt")
        var mount: Mount? = try Mount(source: source, at: mnt, extra: ["--target", target])
        waitForJob(mnt, containing: #""ready": true"#)
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x77 5M 64k", mount!.image])
        mount!.stop(signal: SIGKILL)
        mount = nil
        // Flip one header byte.
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: target + ".dirtylog"))
        try handle.seek(toOffset: 70)
        handle.write(Data([0xAB]))
        try handle.close()
        let restarted = try Mount(source: source, at: mnt, extra: ["--target", target])
        let json = waitForJob(mnt, containing: #""ready": true"#)
        XCTAssertTrue(json.contains(#""resync-bytes": \#(32 << 20)"#), json)
        XCTAssertEqual(restarted.stop(), 0)
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
        XCTAssertEqual(compare.status, 0)
    }
}
