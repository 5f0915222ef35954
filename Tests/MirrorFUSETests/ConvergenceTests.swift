import Foundation
import XCTest

/// SPEC 10: a job that does not converge says so, `--auto-write-blocking` makes it end,
/// and the forecast's time to go holds.
final class ConvergenceTests: XCTestCase {
    /// A copy limited to 16 MiB/s under four writers that dirty clean regions as fast as it
    /// copies them: without the option it is not ready after 30 s, and job.json and the
    /// status line say it does not converge (no time to go).
    func testACopyTheWritesOutpaceIsNotReadyAndSaysItDoesNotConverge() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 128 << 20, randomPieces: [(0, 128 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", scratch.file("target.raw"), "--speed", "16M"])
        let fio = try startWriters(mount.image, runtime: 120)
        defer { if fio.isRunning { fio.terminate() }; fio.waitUntilExit() }
        let end = Date().addingTimeInterval(30)
        var notConverging = 0
        while Date() < end {
            let state = job(mount)
            XCTAssertEqual(state?["ready"] as? Bool, false, "ready under writers that outpace the copy")
            if state?["converging"] as? Bool == false { notConverging += 1 }
            usleep(1_000_000)
        }
        let state = job(mount)
        XCTAssertEqual(state?["ready"] as? Bool, false)
        XCTAssertEqual(state?["converging"] as? Bool, false, "\(state ?? [:])")
        XCTAssertTrue(state?["eta-seconds"] is NSNull, "a time to go for a job that does not converge: \(state ?? [:])")
        XCTAssertGreaterThan(state?["dirty-rate"] as? Int ?? 0, 0)
        XCTAssertGreaterThan(state?["copy-rate"] as? Int ?? 0, 0)
        XCTAssertGreaterThanOrEqual(notConverging, 20, "converging in more than a third of 30 samples")
        let line = try execute(mirrorfsBinary, ["status", mount.mountpoint], environment: ["COLUMNS": "400"]).stdout
        XCTAssertTrue(line.contains("eta not converging"), line)
        let metrics = try String(contentsOfFile: mount.mountpoint + "/.status/metrics.prom", encoding: .utf8)
        XCTAssertTrue(metrics.contains("mirrorfs_job_converging{"), metrics)
        XCTAssertFalse(metrics.contains("mirrorfs_job_eta_seconds{"), "an eta sample while not converging")
        fio.terminate()
        fio.waitUntilExit()
        try check(mirrorfsBinary, ["job", "cancel", mount.mountpoint, "--force"])
        XCTAssertEqual(mount.stop(), 0)
    }

    /// The same job with --auto-write-blocking-after 5 switches itself to write-blocking,
    /// says so in events.jsonl, reaches actively-synced within 30 s, and completes to an
    /// identical image.
    func testAutoWriteBlockingEndsAMigrationTheWritesOutpace() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 128 << 20, randomPieces: [(0, 128 << 20)])
        let target = scratch.file("target.raw")
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", target, "--speed", "16M", "--auto-write-blocking-after", "5"])
        let fio = try startWriters(mount.image, runtime: 120)
        defer { if fio.isRunning { fio.terminate() }; fio.waitUntilExit() }
        XCTAssertTrue(waitUntil("actively-synced", timeout: 30) { job(mount)?["actively-synced"] as? Bool == true },
                      "\(job(mount) ?? [:])")
        XCTAssertTrue(fio.isRunning, "the writers still run")
        XCTAssertEqual(job(mount)?["copy-mode"] as? String, "write-blocking")
        XCTAssertTrue(events(mount).contains("__org.mirrorfs_BLOCK_JOB_AUTO_WRITE_BLOCKING"), "\(events(mount))")
        XCTAssertEqual(job(mount)?["converging"] as? Bool, true)
        fio.terminate()
        fio.waitUntilExit()
        try completeStopAndCompare(mount, source: source, target: target)
    }

    /// The forecast of a 512 MiB copy limited to 64 MiB/s with no writers: eta-seconds,
    /// read once the copy is under way, is within ±25 % of the time the job then takes to
    /// be ready.
    func testTheTimeToGoOfASpeedLimitedCopyHolds() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 512 << 20, randomPieces: [(0, 512 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", scratch.file("target.raw"), "--speed", "64M"])
        XCTAssertTrue(waitUntil("under way", timeout: 30) { (job(mount)?["offset"] as? Int ?? 0) >= 96 << 20 })
        let asked = Date()
        let state = job(mount)
        let eta = try XCTUnwrap(state?["eta-seconds"] as? Double, "\(state ?? [:])")
        XCTAssertEqual(state?["converging"] as? Bool, true)
        XCTAssertTrue(waitUntil("ready", timeout: 60) { job(mount)?["ready"] as? Bool == true })
        let took = Date().timeIntervalSince(asked)
        XCTAssertEqual(eta, took, accuracy: took * 0.25, "forecast \(eta) s, took \(took) s")
        print("forecast \(eta) s, took \(String(format: "%.1f", took)) s")
        try check(mirrorfsBinary, ["job", "cancel", mount.mountpoint])
        XCTAssertEqual(mount.stop(), 0)
    }
}
