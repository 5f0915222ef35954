import CLinux
import Foundation
import MirrorCore
import MirrorFUSE
import MirrorSetup

/// What a server that takes a mount over needs from the one before it (SPEC 11), kept
/// beside the control socket: the kernel's FUSE_INIT and the reply
/// the first server made, what the image is served from, the job to resume, and the
/// events so far. Written whole (a new file renamed over the old) whenever it changes.
struct SessionRecord: Codable {
    var initRequest: [UInt8] = []
    var initReply: [UInt8] = []
    /// The device served when it is not SOURCE (the target after a pivot).
    var serving: String?
    /// The running job's request, with its copy mode and speed as they are now.
    var job: JobRequest?

}

final class ServerSession: Sendable {
    let path: String
    let eventsPath: String
    /// The record, and the bytes last written for it. An empty record needs no file (a
    /// fresh mount starts with none), so it counts as written.
    private let current = ConditionLock<(record: SessionRecord, written: Data?)>(
        (SessionRecord(), try? JSONEncoder().encode(SessionRecord())))

    /// Beside the mount's control socket (`S.qmp` → `S.session`, `S.events`).
    init(socketPath: String) {
        let base = socketPath.hasSuffix(".qmp") ? String(socketPath.dropLast(4)) : socketPath
        path = base + ".session"
        eventsPath = base + ".events"
    }

    /// The record a dead server left; a one-line error when there is none.
    func load() throws -> SessionRecord {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CLIError("no server record at \(path): this connection cannot be taken over")
        }
        do {
            let record = try JSONDecoder().decode(SessionRecord.self, from: data)
            current.withLock { $0 = (record, data) }
            return record
        } catch {
            throw CLIError("the server record \(path) is unreadable: \(error)")
        }
    }

    /// Changes the record and writes it when it changed. A failure is logged: the mount
    /// goes on, only a later takeover would lack it.
    func update(_ change: (inout SessionRecord) -> Void) {
        current.withLock { current in
            change(&current.record)
            guard let data = try? JSONEncoder().encode(current.record), data != current.written else { return }
            let temporary = path + ".new"
            let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { return Log.info("cannot write the server record \(temporary): \(String(cString: strerror(errno)))") }
            let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
            guard written == data.count, rename(temporary, path) == 0 else {
                unlink(temporary)
                return Log.info("cannot write the server record \(path): \(String(cString: strerror(errno)))")
            }
            current.written = data
        }
    }

    /// One event line, appended as it happens, so that events.jsonl goes on across servers.
    func append(event line: String) {
        let fd = open(eventsPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }

    /// The events of the servers before, newest `capacity` of them (the file is cut to those).
    func previousEvents(capacity: Int) -> [String] {
        guard let text = try? String(contentsOfFile: eventsPath, encoding: .utf8) else { return [] }
        let lines = text.split(separator: "\n").map(String.init)
        guard lines.count > capacity else { return lines }
        let kept = Array(lines.suffix(capacity))
        try? (kept.joined(separator: "\n") + "\n").write(toFile: eventsPath, atomically: true, encoding: .utf8)
        return kept
    }

    /// A fresh mount starts a fresh record; the end of the mount removes it.
    func remove() {
        unlink(path)
        unlink(eventsPath)
    }
}

/// The server's half of the keeper's channel: a datagram socket (`--keeper-fd`).
final class KeeperChannel: Sendable {
    let fd: Int32
    init(fd: Int32) {
        self.fd = fd
        // Nothing the server starts may hold the keeper's socket.
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
    }

    /// The mount's descriptor, once mounted: from now on the keeper holds the connection.
    func sendMounted(fd fuseFD: Int32) throws {
        guard clinux_send_text_and_fd(fd, "mounted", fuseFD) == 0 else {
            throw CLIError("cannot hand the FUSE descriptor to the keeper: \(String(cString: strerror(errno)))")
        }
    }
    func send(_ text: String) { _ = clinux_send_text_and_fd(fd, String(text.prefix(590)), -1) }
}

/// The keeper's executable: beside this one (a build), or in ../libexec/mirrorfs (the package).
enum Keeper {
    static let name = "mirrorfs-keeper"
    /// The server's exit status after a hand-over (the keeper then starts the next one).
    static let handOverStatus: Int32 = 75

    static func locate(executable: String) -> String? {
        let directory = URL(fileURLWithPath: executable).deletingLastPathComponent()
        let candidates = [directory.appendingPathComponent(name).path,
                          directory.deletingLastPathComponent().appendingPathComponent("libexec/mirrorfs/" + name).path]
        return candidates.first { access($0, X_OK) == 0 }
    }

    /// This process becomes the keeper (same pid: a service manager's main process, a
    /// caller's child), which starts `serverArguments` as the server.
    static func exec(_ keeper: String, mountpoint: String, serverArguments: [String]) throws -> Never {
        let words = [keeper, "--mountpoint", mountpoint, "--"] + serverArguments
        let argv = words.map { strdup($0) } + [nil]
        execv(keeper, argv)
        throw CLIError("cannot run the keeper \(keeper): \(String(cString: strerror(errno)))")
    }
}
