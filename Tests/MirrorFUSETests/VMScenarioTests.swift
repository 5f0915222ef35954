import Foundation
import XCTest

/// A VM whose disk is the mounted file moves to new storage while it runs
/// (tools/vm-test/run): mirror, switch to write-blocking, pivot while the guest writes,
/// then the target is checked on the host and booted alone.
final class VMScenarioTests: XCTestCase {
    private func scenario(_ mode: String, cache: String) throws {
        let (status, output) = try runTool("tools/vm-test/run", [mode, cache])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("== PASS: \(mode), cache=\(cache)"), output)
    }

    func testPatternGuestWithCacheNone() throws { try scenario("pattern", cache: "none") }
    func testPatternGuestWithCacheWriteback() throws { try scenario("pattern", cache: "writeback") }
    func testExt2GuestWithCacheNone() throws { try scenario("ext2", cache: "none") }
}
