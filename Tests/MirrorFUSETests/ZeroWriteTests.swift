import Foundation
import XCTest

/// SPEC 10: zeroes stay thin on the target — allocated zero blocks the copier finds, a
/// ZERO_RANGE and written zeroes through a write-blocking mount all leave holes there.
final class ZeroWriteTests: XCTestCase {
    /// The ranges of `file` that hold data, from `qemu-img map` (SEEK_DATA/SEEK_HOLE).
    private func dataRanges(_ file: String) throws -> [Range<Int>] {
        let map = try check("qemu-img", ["map", "-f", "raw", "--output=json", file])
        let entries = try JSONSerialization.jsonObject(with: Data(map.utf8)) as? [[String: Any]] ?? []
        return entries.compactMap { entry in
            guard entry["data"] as? Bool == true, let start = entry["start"] as? Int, let length = entry["length"] as? Int else { return nil }
            return start..<(start + length)
        }
    }

    /// Mirrors a source with allocated zero blocks in write-blocking mode to `target`, then
    /// zeroes two ranges through the mount (ZERO_RANGE, and 1 MiB of written zeroes);
    /// `targetFile` must hold no data in any of the three, and the images are identical.
    private func zeroesStayThin(source: String, target: String, targetFile: String, scratch: Scratch) throws {
        let mib = 1 << 20
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0 16M 8M", source])  // allocated zeroes
        let mount = try Mount(source: source, at: try scratch.directory("mnt"),
                              extra: ["--target", target, "--copy-mode", "write-blocking"])
        XCTAssertTrue(waitUntil("actively-synced", timeout: 60) { job(mount)?["actively-synced"] as? Bool == true })
        for command in ["write -P 0x44 40M 1M", "write -z 40M 1M",        // ZERO_RANGE over data
                        "write -P 0x55 48M 1M", "write -P 0 48M 1M"] {    // written zeroes over data
            try check("qemu-io", ["-f", "raw", "-c", command, mount.image])
        }
        XCTAssertEqual(job(mount)?["actively-synced"] as? Bool, true)
        let data = try dataRanges(targetFile)
        for zeroed in [(16 * mib)..<(24 * mib), (40 * mib)..<(41 * mib), (48 * mib)..<(49 * mib)] {
            XCTAssertFalse(data.contains { $0.overlaps(zeroed) }, "data in \(zeroed) of the target: \(data)")
        }
        XCTAssertTrue(data.contains { $0.contains(0) }, "the source's data is in the target: \(data)")
        try completeStopAndCompare(mount, source: source, target: targetFile)
    }

    func testZeroesStayThinOnAFileTarget() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 8 << 20), (32 << 20, 4 << 20)])
        let target = scratch.file("target.raw")
        try zeroesStayThin(source: source, target: target, targetFile: target, scratch: scratch)
    }

    func testZeroesStayThinOnQemuNBDWithDiscardUnmap() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(0, 8 << 20), (32 << 20, 4 << 20)])
        let exported = try scratch.image("export.raw", size: 64 << 20)  // sparse
        let server = try UnixNBDServer("qemu-nbd", in: scratch.path, name: "zeroes", ["--discard=unmap", exported])
        defer { server.stop() }
        try zeroesStayThin(source: source, target: server.uri, targetFile: exported, scratch: scratch)
    }
}
