import CLinux
import Foundation
import XCTest

/// The image file through a real kernel mount, driven by the clients a user would use.
final class ImageIOTests: XCTestCase {
    func testQemuIOPatternsAtUnalignedOffsetsReadBackAndCompareIdentical() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 64 << 20, randomPieces: [(3 << 20, 1 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        // Unaligned offsets and sizes, buffered; then aligned ones through O_DIRECT (cache=none).
        let buffered: [(String, String, String)] = [("0x11", "1", "511"), ("0x22", "4097", "100000"),
                                                   ("0x33", "1048575", "2097153"), ("0x44", "67108000", "864")]
        for (pattern, offset, length) in buffered {
            try check("qemu-io", ["-f", "raw", "-c", "write -P \(pattern) \(offset) \(length)",
                                  "-c", "read -P \(pattern) \(offset) \(length)", mount.image])
        }
        try check("qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x55 8M 1M",
                              "-c", "read -P 0x55 8M 1M", "-c", "aio_write -P 0x66 12M 64k",
                              "-c", "aio_flush", "-c", "read -P 0x66 12M 64k", mount.image])
        // Data the source already had reads back unchanged through the mount.
        let result = try execute("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, mount.image])
        XCTAssertEqual(result.status, 0, result.stdout + result.stderr)
        XCTAssertTrue(result.stdout.contains("Images are identical"), result.stdout)
        // ...and the patterns are really in the source, not only in some cache.
        try check("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x22 4097 100000", "-c", "read -P 0x55 8M 1M", source])
        XCTAssertEqual(mount.stop(), 0)
    }

    func testODirectClientsServedThroughThePageCacheWithOdirectCached() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20)
        let mount = try Mount(source: source, at: try scratch.directory("mnt"), extra: ["--odirect", "cached"])
        try check("qemu-io", ["-f", "raw", "-t", "none", "-c", "write -P 0x4d 1M 1M", "-c", "read -P 0x4d 1M 1M", mount.image])
        try check("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x4d 1M 1M", source])
        XCTAssertEqual(mount.stop(), 0)
        let bad = try execute(mirrorfsBinary, ["mount", source, scratch.file("mnt"), "--odirect", "sometimes"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertEqual(bad.stderr.split(separator: "\n").count, 1, bad.stderr)
    }

    func testFioVerifiesFourWritersDirectAndBuffered() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 128 << 20)
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        for direct in ["1", "0"] {
            for (rw, bs) in [("randwrite", "4k"), ("write", "1M")] {
                // Each of the 4 jobs owns a 32 MiB slice, so verification is per job.
                let out = try check("fio", [
                    "--name=verify", "--filename=\(mount.image)", "--rw=\(rw)", "--bs=\(bs)",
                    "--direct=\(direct)", "--numjobs=4", "--size=32M", "--offset_increment=32M",
                    "--ioengine=psync", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                    "--group_reporting", "--output-format=terse",
                ])
                XCTAssertFalse(out.isEmpty)
            }
        }
        XCTAssertEqual(mount.stop(), 0)
    }

    func testPunchedHoleShowsInSeekDataHoleAndSourceBlocks() throws {
        let scratch = try Scratch()
        let size: UInt64 = 16 << 20
        let source = try scratch.image("disk.raw", size: size, randomPieces: [(0, 8 << 20)])
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        let blocksBefore = try fileStatus(source).st_blocks

        let fd = open(mount.image, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(lseek(fd, 0, CLINUX_SEEK_HOLE), 8 << 20, "before: data 0–8 MiB, hole after")
        XCTAssertEqual(clinux_fallocate(fd, CLINUX_FALLOC_FL_PUNCH_HOLE | CLINUX_FALLOC_FL_KEEP_SIZE, 2 << 20, 1 << 20), 0, String(cString: strerror(errno)))
        XCTAssertEqual(lseek(fd, 0, CLINUX_SEEK_HOLE), 2 << 20)
        XCTAssertEqual(lseek(fd, 2 << 20, CLINUX_SEEK_DATA), 3 << 20)
        XCTAssertEqual(lseek(fd, 9 << 20, CLINUX_SEEK_DATA), -1)
        XCTAssertEqual(errno, ENXIO)
        XCTAssertEqual(try fileStatus(source).st_blocks, blocksBefore - (1 << 20) / 512)
        XCTAssertEqual(try fileStatus(mount.image).st_blocks, blocksBefore - (1 << 20) / 512, "stat through the mount")
        var zero = [UInt8](repeating: 0xff, count: 4096)
        XCTAssertEqual(pread(fd, &zero, 4096, 2 << 20), 4096)
        XCTAssertEqual(zero, [UInt8](repeating: 0, count: 4096))

        // ZERO_RANGE keeps the range allocated and reads back zeroes.
        XCTAssertEqual(clinux_fallocate(fd, CLINUX_FALLOC_FL_ZERO_RANGE | CLINUX_FALLOC_FL_KEEP_SIZE, 5 << 20, 64 << 10), 0, String(cString: strerror(errno)))
        XCTAssertEqual(pread(fd, &zero, 4096, 5 << 20), 4096)
        XCTAssertEqual(zero, [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(try fileStatus(source).st_size, off_t(size))
        XCTAssertEqual(mount.stop(), 0)
    }

    func testTerabyteSparseSourceMountsInUnderASecond() throws {
        let scratch = try Scratch()
        let source = try scratch.image("huge.raw", size: 1 << 40)
        let start = Date()
        try check(mirrorfsBinary, ["mount", source, try scratch.directory("mnt"), "--daemonize", "--log-file", scratch.file("log")])
        let mounted = Date().timeIntervalSince(start)
        defer { _ = try? execute(mirrorfsBinary, ["unmount", scratch.file("mnt")]) }
        XCTAssertLessThan(mounted, 1.0, "mount took \(mounted) s")
        XCTAssertEqual(try fileStatus(scratch.file("mnt/huge.raw")).st_size, 1 << 40)
        try check("qemu-io", ["-f", "raw", "-c", "write -P 0x77 1023G 4k", "-c", "read -P 0x77 1023G 4k", scratch.file("mnt/huge.raw")])
    }

    /// Another process's locks as seen through the mount: "ofd 1 posix 1 flock 1" means all three conflict.
    private func lockConflicts(_ path: String) throws -> String {
        let probe = """
            import fcntl, os, struct, sys
            def conflict(cmd, start):
                fd = os.open(sys.argv[1], os.O_RDWR)
                try:
                    fcntl.fcntl(fd, cmd, struct.pack("hhqqi", fcntl.F_WRLCK, 0, start, 1, 0)); return 0
                except OSError: return 1
                finally: os.close(fd)
            fd = os.open(sys.argv[1], os.O_RDWR)
            try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); f = 0
            except OSError: f = 1
            print("ofd", conflict(fcntl.F_OFD_SETLK, 100), "posix", conflict(fcntl.F_SETLK, 300), "flock", f)
            """
        return try check(testPython, ["-c", probe, path]).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func testLocksWorkThroughTheMountAsOnALocalFile() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 16 << 20)
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        XCTAssertEqual(try lockConflicts(mount.image), "ofd 0 posix 0 flock 0")

        // A process holding an OFD lock, a POSIX lock and a flock on the image through the mount.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: testPython)
        holder.arguments = ["-c", """
            import fcntl, os, struct, sys
            fd = os.open(sys.argv[1], os.O_RDWR)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 100, 1, 0))
            fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 300, 1, 0))
            fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.read()
            """, mount.image]
        let stdin = Pipe(), stdout = Pipe()
        holder.standardInput = stdin
        holder.standardOutput = stdout
        try holder.run()
        // A holder that never says "locked" is stopped after 10 s, which ends the read below.
        DispatchQueue.global().asyncAfter(deadline: .now() + 10) { if holder.isRunning { holder.terminate() } }
        var said = Data()
        while !said.contains(UInt8(ascii: "\n")) {
            let more = stdout.fileHandleForReading.availableData
            if more.isEmpty { break }
            said += more
        }
        XCTAssertEqual(String(decoding: said, as: UTF8.self), "locked\n")
        XCTAssertEqual(try lockConflicts(mount.image), "ofd 1 posix 1 flock 1")
        try stdin.fileHandleForWriting.close()
        holder.waitUntilExit()
        XCTAssertEqual(try lockConflicts(mount.image), "ofd 0 posix 0 flock 0", "released with the holder")

        // QEMU's own image locks (OFD locks on bytes 100+) are seen through the mount too.
        let qsd = Process()
        qsd.executableURL = URL(fileURLWithPath: try which("qemu-storage-daemon"))
        qsd.arguments = ["--blockdev", "driver=file,filename=\(mount.image),node-name=disk",
                         "--nbd-server", "addr.type=unix,addr.path=\(scratch.file("nbd.sock"))",
                         "--export", "type=nbd,id=export,node-name=disk,writable=on"]
        try qsd.run()
        defer { qsd.terminate(); qsd.waitUntilExit() }
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: scratch.file("nbd.sock")) && Date() < deadline { usleep(50_000) }
        XCTAssertTrue(try lockConflicts(mount.image).hasPrefix("ofd 1"), "QEMU's lock bytes are held")
        qsd.terminate()
        qsd.waitUntilExit()
        XCTAssertEqual(mount.stop(), 0)
    }

    func testStatusFilesShowNoJobAndAreAlwaysFresh() throws {
        let scratch = try Scratch()
        let source = try scratch.image("disk.raw", size: 1 << 20)
        let mount = try Mount(source: source, at: try scratch.directory("mnt"))
        let entries = try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted()
        XCTAssertEqual(entries, [".status", "disk.raw"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint + "/.status").sorted(),
                       ["events.jsonl", "job.json", "metrics.prom"])
        XCTAssertEqual(try check("cat", [mount.mountpoint + "/.status/job.json"]), "null\n")
        XCTAssertEqual(try check("jq", ["-c", ".", mount.mountpoint + "/.status/job.json"]), "null\n")
        XCTAssertEqual(try fileStatus(mount.mountpoint + "/.status/job.json").st_size, 5)
        XCTAssertEqual(try check("cat", [mount.mountpoint + "/.status/events.jsonl"]), "")
        XCTAssertEqual(try fileStatus(mount.image).st_size, 1 << 20)
        XCTAssertEqual(mount.stop(), 0)
    }
}

func fileStatus(_ path: String) throws -> stat {
    var st = stat()
    guard stat(path, &st) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    return st
}
