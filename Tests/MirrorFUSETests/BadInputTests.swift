import Foundation
import XCTest

/// SPEC section 6: every bad input gets one clear line and a non-zero exit, or the
/// right errno through the mount, and no byte of the source changes.
final class BadInputTests: XCTestCase {
    /// Runs `mirrorfs mount` expecting a refusal naming `expected`; checks nothing was mounted or touched.
    private func assertMountRefused(_ arguments: [String], mentions expected: String, source: String?,
                                    mountpoint: String?, runAs user: String? = nil,
                                    file: StaticString = #filePath, line: UInt = #line) throws {
        let before = try source.map { try sha256($0) }
        let command = user.map { ["setpriv", "--reuid=\($0)", "--regid=\($0)", "--clear-groups", mirrorfsBinary] } ?? [mirrorfsBinary]
        let result = try execute(command[0], Array(command.dropFirst()) + ["mount"] + arguments, timeout: 20)
        XCTAssertNotEqual(result.status, 0, file: file, line: line)
        let lines = result.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "one line: \(result.stderr)", file: file, line: line)
        XCTAssertTrue(result.stderr.hasPrefix("mirrorfs: error: "), result.stderr, file: file, line: line)
        XCTAssertTrue(result.stderr.contains(expected), "'\(expected)' not in: \(result.stderr)", file: file, line: line)
        if let source { XCTAssertEqual(try sha256(source), before, "source changed", file: file, line: line) }
        if let mountpoint { XCTAssertFalse(isMounted(mountpoint), file: file, line: line) }
    }

    func testMountRefusesBadSourcesBeforeMounting() throws {
        let scratch = try Scratch()
        let mnt = try scratch.directory("mnt")
        try assertMountRefused([scratch.file("missing.raw"), mnt], mentions: "No such file or directory", source: nil, mountpoint: mnt)
        let dir = try scratch.directory("adir")
        try assertMountRefused([dir, mnt], mentions: "is not a regular file", source: nil, mountpoint: mnt)
        try assertMountRefused(["/dev/null", mnt], mentions: "is not a regular file", source: nil, mountpoint: mnt)
        XCTAssertEqual(mkfifo(scratch.file("fifo"), 0o644), 0)
        try assertMountRefused([scratch.file("fifo"), mnt], mentions: "is not a regular file", source: nil, mountpoint: mnt)

        // Permissions bind only a non-root user: run the CLI as `nobody` for these.
        XCTAssertEqual(chmod(scratch.path, 0o755), 0)
        let unreadable = try scratch.image("secret.raw", size: 1 << 20, randomPieces: [(0, 4096)])
        XCTAssertEqual(chmod(unreadable, 0o000), 0)
        let userMnt = try scratch.directory("usermnt")
        XCTAssertEqual(chown(userMnt, 65534, 65534), 0)
        try assertMountRefused([unreadable, userMnt], mentions: "cannot read source", source: unreadable,
                               mountpoint: userMnt, runAs: "65534")
        let readOnlySource = try scratch.image("ro.raw", size: 1 << 20, randomPieces: [(0, 4096)])
        XCTAssertEqual(chmod(readOnlySource, 0o444), 0)
        try assertMountRefused([readOnlySource, userMnt], mentions: "is not writable", source: readOnlySource,
                               mountpoint: userMnt, runAs: "65534")
    }

    func testMountRefusesBadMountpointsBeforeMounting() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 1 << 20, randomPieces: [(0, 1 << 20)])
        try assertMountRefused([source, scratch.file("nowhere")], mentions: "No such file or directory", source: source, mountpoint: nil)
        try assertMountRefused([source, source], mentions: "is not a directory", source: source, mountpoint: nil)
        let full = try scratch.directory("full")
        _ = FileManager.default.createFile(atPath: full + "/keep", contents: Data("x".utf8))
        try assertMountRefused([source, full], mentions: "is not empty", source: source, mountpoint: full)
        XCTAssertEqual(try String(contentsOfFile: full + "/keep", encoding: .utf8), "x")
    }

    func testMountRefusesUnknownOptionsInOneLine() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 1 << 20)
        let mnt = try scratch.directory("mnt")
        try assertMountRefused([source, mnt, "--no-such-option"], mentions: "--no-such-option", source: source, mountpoint: mnt)
        try assertMountRefused([source], mentions: "Missing expected argument", source: source, mountpoint: nil)
    }

    func testRefusedOperationsThroughTheMountLeaveTheSourceUnchanged() throws {
        let scratch = try Scratch()
        let size = 4 << 20
        let source = try scratch.image("disk.raw", size: UInt64(size), randomPieces: [(0, 4 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        let before = try sha256(source)
        let image = mount.image
        func expectErrno(_ expected: [Int32], _ what: String, _ body: () -> Int32) {
            errno = 0
            let result = body()
            XCTAssertEqual(result, -1, "\(what) succeeded")
            XCTAssertTrue(expected.contains(errno), "\(what): errno \(errno) (\(String(cString: strerror(errno))))")
        }
        expectErrno([EPERM], "truncate") { truncate(image, 0) }
        expectErrno([EPERM], "truncate larger") { truncate(image, off_t(size * 2)) }
        expectErrno([EPERM], "O_TRUNC") { open(image, O_WRONLY | O_TRUNC) }
        expectErrno([EPERM, EACCES], "create") { open(mount.mountpoint + "/new.raw", O_CREAT | O_WRONLY, 0o644) }
        expectErrno([EPERM, EACCES], "unlink") { unlink(image) }
        expectErrno([EPERM, EACCES], "rename") { rename(image, mount.mountpoint + "/other.raw") }
        expectErrno([EPERM, EACCES], "mkdir") { mkdir(mount.mountpoint + "/dir", 0o755) }
        expectErrno([EPERM, EACCES], "chmod") { chmod(image, 0o600) }
        expectErrno([EPERM, EACCES], "chown") { chown(image, 1, 1) }
        expectErrno([EPERM, EACCES], "symlink") { symlink(image, mount.mountpoint + "/link") }
        expectErrno([EPERM, EACCES], "link") { link(image, mount.mountpoint + "/hard") }
        expectErrno([EACCES, EPERM], "write-open job.json") { open(mount.mountpoint + "/.status/job.json", O_WRONLY) }
        expectErrno([EACCES, EPERM], "write-open events.jsonl") { open(mount.mountpoint + "/.status/events.jsonl", O_RDWR) }
        expectErrno([EPERM, EACCES], "unlink job.json") { unlink(mount.mountpoint + "/.status/job.json") }
        XCTAssertEqual(try sha256(source), before)

        // Writes reaching past the end are cut there; nothing fits past it: ENOSPC.
        let fd = open(image, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let bytes = [UInt8](repeating: 0xee, count: 8192)
        XCTAssertEqual(pwrite(fd, bytes, 8192, off_t(size - 100)), 100, "short write at the end")
        expectErrno([ENOSPC], "write at the end") { Int32(pwrite(fd, bytes, 10, off_t(size))) }
        expectErrno([ENOSPC], "write past the end") { Int32(pwrite(fd, bytes, 10, off_t(size + 4096))) }
        close(fd)
        XCTAssertEqual(try fileStatus(source).st_size, off_t(size))
        XCTAssertEqual(try fileStatus(image).st_size, off_t(size))
        // Only the last 100 bytes changed.
        let data = try Data(contentsOf: URL(fileURLWithPath: source))
        XCTAssertEqual(Array(data.suffix(100)), [UInt8](repeating: 0xee, count: 100))
        XCTAssertEqual(mount.stop(), 0)
    }

    func testReadOnlyMountRefusesWritesWithEROFS() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 1 << 20, randomPieces: [(0, 1 << 20)])
        let before = try sha256(source)
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--read-only"])
        errno = 0
        XCTAssertEqual(open(mount.image, O_RDWR), -1)
        XCTAssertEqual(errno, EROFS)
        XCTAssertEqual(try sha256(mount.image), before, "reads still work")
        let write = try execute("qemu-io", ["-f", "raw", "-c", "write 0 4k", mount.image])
        XCTAssertNotEqual(write.status, 0)
        XCTAssertEqual(try sha256(source), before)
        XCTAssertEqual(mount.stop(), 0)
    }
}
