import Foundation
import XCTest

/// The dirty log through real crashes: `kill -9` of the daemon under load, restart, compare.
final class CrashTests: XCTestCase {
    private let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    /// 10 trials per copy mode (tools/crash-test runs any number).
    func testKillNineUnderFourWritersThenRestartResyncsOnlyLoggedRegions() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: root + "/tools/crash-test")
        process.arguments = [ProcessInfo.processInfo.environment["MIRRORFS_CRASH_TRIALS"] ?? "10", "both"]
        var environment = ProcessInfo.processInfo.environment
        environment["MIRRORFS"] = mirrorfsBinary
        process.environment = environment
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0, text)
        XCTAssertTrue(text.contains("trials identical with resync within the log"), text)
        print(text)
    }

    /// After the sweeps have cleared the regions the initial copy finished, a crash resyncs
    /// only the region written since: one 64 MiB region of a 512 MiB image.
    func testResumeCopiesOnlyTheRegionsWrittenSinceTheLastSweeps() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 512 << 20, randomPieces: [(0, 64 << 20)])
        let target = scratch.file("target.raw")
        let mnt = try scratch.directory("mnt")
        var mount: Mount? = try Mount(source: source, at: mnt, extra: ["--target", target])
        func job() -> String { (try? String(contentsOfFile: mnt + "/.status/job.json", encoding: .utf8)) ?? "" }
        let deadline = Date().addingTimeInterval(30)
        while !job().contains(#""ready": true"#) && Date() < deadline { usleep(50_000) }
        // Two whole sweep intervals (5 s each) without writes clear every region.
        usleep(11_500_000)
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x21 300M 1M", mount!.image])
        mount!.stop(signal: SIGKILL)
        mount = nil
        let restarted = try Mount(source: source, at: mnt, extra: ["--target", target])
        let again = Date().addingTimeInterval(30)
        while !job().contains(#""ready": true"#) && Date() < again { usleep(50_000) }
        XCTAssertTrue(job().contains(#""resync-bytes": \#(64 << 20)"#), job())
        XCTAssertEqual(restarted.stop(), 0)
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
        XCTAssertEqual(compare.status, 0)
    }

    /// A log that cannot vouch for the target (corrupted here) means a full resync.
    func testCorruptLogAfterACrashLeadsToAFullResync() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 32 << 20, randomPieces: [(0, 32 << 20)])
        let target = scratch.file("target.raw")
        let mnt = try scratch.directory("mnt")
        var mount: Mount? = try Mount(source: source, at: mnt, extra: ["--target", target])
        let deadline = Date().addingTimeInterval(30)
        while !(try String(contentsOfFile: mnt + "/.status/job.json", encoding: .utf8)).contains(#""ready": true"#)
                && Date() < deadline { usleep(50_000) }
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x77 5M 64k", mount!.image])
        mount!.stop(signal: SIGKILL)
        mount = nil
        // Flip one header byte.
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: target + ".dirtylog"))
        try handle.seek(toOffset: 70)
        handle.write(Data([0xAB]))
        try handle.close()
        let restarted = try Mount(source: source, at: mnt, extra: ["--target", target])
        let again = Date().addingTimeInterval(30)
        var json = ""
        repeat {
            json = try String(contentsOfFile: mnt + "/.status/job.json", encoding: .utf8)
            usleep(50_000)
        } while !json.contains(#""ready": true"#) && Date() < again
        XCTAssertTrue(json.contains(#""resync-bytes": \#(32 << 20)"#), json)
        XCTAssertEqual(restarted.stop(), 0)
        let compare = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, target])
        XCTAssertEqual(compare.status, 0)
    }
}
