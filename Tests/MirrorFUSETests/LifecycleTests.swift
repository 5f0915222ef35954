import Foundation
import XCTest

/// Mounting in the foreground and in the background, and every clean way to unmount.
final class LifecycleTests: XCTestCase {
    func testSignalsUnmountCleanly() throws {
        for signal in [SIGTERM, SIGINT] {
            let scratch = try Scratch()
            let source = try scratch.image("disk.raw", size: 1 << 20)
            let mount = try Mount(source: source, at: try scratch.directory("mnt"))
            try check("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 64k", mount.image])
            XCTAssertEqual(mount.stop(signal: signal), 0, "signal \(signal)")
            XCTAssertFalse(isMounted(mount.mountpoint))
            try check("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x5a 0 64k", source])
        }
    }

    func testUnmountCommandAndFusermountUnmountCleanly() throws {
        for how in ["mirrorfs", "fusermount3"] {
            let scratch = try Scratch()
            let source = try scratch.image("disk.raw", size: 1 << 20)
            let mount = try Mount(source: source, at: try scratch.directory("mnt"))
            if how == "mirrorfs" {
                try check(mirrorfsBinary, ["unmount", mount.mountpoint])
            } else {
                try check("fusermount3", ["-u", mount.mountpoint])
            }
            XCTAssertEqual(mount.waitForExit(), 0, how)
            XCTAssertFalse(isMounted(mount.mountpoint))
        }
    }

    func testUnmountRefusesWhatIsNotAMirrorfsMount() throws {
        let scratch = try Scratch()
        let result = try execute(mirrorfsBinary, ["unmount", try scratch.directory("plain")])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertEqual(result.stderr.split(separator: "\n").count, 1)
        XCTAssertTrue(result.stderr.contains("is not a mirrorfs mount"), result.stderr)
    }

    func testDaemonizeReturnsOnceTheMountIsUsable() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 4 << 20, randomPieces: [(0, 4096)])
        let log = scratch.file("daemon.log")
        // The very next command uses the mount: no wait in between.
        let script = """
            set -e
            '\(mirrorfsBinary)' mount '\(source)' '\(scratch.path)/mnt' --daemonize --log-file '\(log)'
            cat '\(scratch.path)/mnt/.status/job.json'
            cmp -n 4096 '\(source)' '\(scratch.path)/mnt/disk.raw'
            """
        try FileManager.default.createDirectory(atPath: scratch.file("mnt"), withIntermediateDirectories: true)
        let result = try execute("/bin/sh", ["-c", script], timeout: 20)
        defer { _ = try? execute(mirrorfsBinary, ["unmount", scratch.file("mnt")]) }
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertEqual(result.stdout, "null\n")
        XCTAssertEqual(result.stderr, "", "the daemon must not write to the caller's stderr")
        XCTAssertTrue(try String(contentsOfFile: log, encoding: .utf8).contains("serving"))
    }

    func testDaemonizeReportsAFailureAfterItsChecksAsOneLine() throws {
        // A non-root user may not pass allow_other unless /etc/fuse.conf says
        // user_allow_other: the checks pass, then the daemon's mount fails.
        let conf = (try? String(contentsOfFile: "/etc/fuse.conf", encoding: .utf8)) ?? ""
        XCTAssertFalse(conf.split(separator: "\n").contains { $0.hasPrefix("user_allow_other") },
                       "this test needs /etc/fuse.conf without user_allow_other")
        let scratch = try Scratch()
        XCTAssertEqual(chmod(scratch.path, 0o755), 0)
        let source = try scratch.image("disk.raw", size: 1 << 20)
        let mnt = try scratch.directory("mnt")
        XCTAssertEqual(chown(source, 65534, 65534), 0)
        XCTAssertEqual(chown(mnt, 65534, 65534), 0)
        let logs = try scratch.directory("logs")
        XCTAssertEqual(chown(logs, 65534, 65534), 0)
        let result = try execute("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", mirrorfsBinary, "mount",
                                         source, mnt, "--allow-other", "--daemonize", "--log-file", logs + "/daemon.log"],
                             timeout: 20)
        XCTAssertNotEqual(result.status, 0)
        XCTAssertEqual(result.stderr.split(separator: "\n").count, 1, result.stderr)
        XCTAssertTrue(result.stderr.contains("cannot mount"), result.stderr)
        XCTAssertFalse(isMounted(mnt))
        // Nothing of the failed mount is left in the user's runtime directory (socket, server record).
        let left = ((try? FileManager.default.contentsOfDirectory(atPath: "/tmp/mirrorfs-65534")) ?? [])
            .filter { $0.contains(URL(fileURLWithPath: scratch.path).lastPathComponent) }
        XCTAssertEqual(left, [], "left behind by a mount that failed")
    }
}
