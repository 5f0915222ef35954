import Foundation
import XCTest

/// A VM whose disk is the mounted file moves to new storage while it runs
/// (tools/vm-test/run): mirror, switch to write-blocking, pivot while the guest writes,
/// then the target is checked on the host and booted alone.
final class VMScenarioTests: XCTestCase {
    private func scenario(_ mode: String, cache: String, environment: [String: String] = [:]) throws {
        let (status, output) = try runTool("tools/vm-test/run", [mode, cache], environment: environment)
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("== PASS: \(mode), cache=\(cache)"), output)
    }

    func testPatternGuestWithCacheNone() throws { try scenario("pattern", cache: "none") }
    func testPatternGuestWithCacheWriteback() throws { try scenario("pattern", cache: "writeback") }
    /// (10 rounds: with background writes going through to the target after ready, the
    /// migration is quick enough that 5 could end before the pivot.)
    func testExt2GuestWithCacheNone() throws { try scenario("ext2", cache: "none", environment: ["ROUNDS": "10"]) }

    /// The same while the serving daemon is killed with -9 three times (background copy,
    /// actively synced, after the pivot) and handed over once: the guest sees no I/O error
    /// and its pattern checks on the target.
    func testPatternGuestSeesNoErrorWhenTheServerDiesOrIsReplaced() throws {
        try scenario("pattern", cache: "none", environment: ["KILLS": "1", "ROUNDS": "8"])
    }
}
