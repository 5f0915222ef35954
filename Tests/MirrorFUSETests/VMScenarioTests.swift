import Foundation
import XCTest

/// A VM whose disk is the mounted file moves to new storage while it runs
/// (tools/vm-test/run): mirror, switch to write-blocking, pivot while the guest writes,
/// then the target is checked on the host and booted alone.
final class VMScenarioTests: XCTestCase {
    private let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    private func scenario(_ mode: String, cache: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: root + "/tools/vm-test/run")
        process.arguments = [mode, cache]
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
        XCTAssertTrue(text.contains("== PASS: \(mode), cache=\(cache)"), text)
    }

    func testPatternGuestWithCacheNone() throws { try scenario("pattern", cache: "none") }
    func testPatternGuestWithCacheWriteback() throws { try scenario("pattern", cache: "writeback") }
    func testExt2GuestWithCacheNone() throws { try scenario("ext2", cache: "none") }
}
