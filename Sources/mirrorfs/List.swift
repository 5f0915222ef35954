import ArgumentParser
import Foundation
import MirrorCore
import MirrorSetup

extension Mirrorfs {
    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List every mirrorfs mount on the host: its image, the file it serves, its daemon and its job.")

        func run() throws {
            let mounts = MountTable.mirrorfsMounts()
            guard !mounts.isEmpty else {
                print("no mirrorfs mounts")
                return
            }
            var rows = [["MOUNTPOINT", "IMAGE", "SERVING", "PID", "RESTARTS", "JOB"]]
            for mount in mounts {
                rows.append(Self.row(for: mount))
            }
            let widths = rows[0].indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
            for row in rows {
                let cells = row.indices.map { $0 == row.count - 1 ? row[$0] : row[$0].padding(toLength: widths[$0], withPad: " ", startingAt: 0) }
                print(cells.joined(separator: "  "))
            }
        }

        /// One mount, asked with short deadlines: a stopped daemon slows the list, never hangs it.
        private static func row(for mount: MountTable.Entry) -> [String] {
            let image = URL(fileURLWithPath: mount.source).lastPathComponent
            let path = mount.mountpoint
            switch MountTable.readRootAttribute(RootAttribute.pid, of: path, timeout: 2) {
            case .failed(let reason) where MountTable.daemonGone(reason):
                return [path, image, "-", "-", "-", "daemon gone: 'mirrorfs mount \(mount.source) \(path)' mounts it again"]
            case .failed(let reason):
                return [path, image, "-", "-", "-", "unreadable: \(String(cString: strerror(reason)))"]
            case .timedOut:
                return [path, image, "-", "-", "-", "not answering (the daemon may be stopped)"]
            case .value(let pid):
                let serving = MountTable.rootAttribute(RootAttribute.serving, of: path, timeout: 2) ?? "?"
                let job: String
                do {
                    let client = try ControlClient(mountpoint: path, deadline: 2)
                    job = try client.currentJob().map(describe) ?? "none"
                } catch {
                    job = "? (\(error))"
                }
                let restarts = MountTable.rootAttribute(RootAttribute.restarts, of: path, timeout: 2) ?? "0"
                return [path, image, serving, pid, restarts, job]
            }
        }

        private static func describe(_ job: JSONValue) -> String {
            func string(_ key: String) -> String { if case .string(let s)? = job[key] { return s }; return "?" }
            func int(_ key: String) -> Int64 { if case .int(let n)? = job[key] { return n }; return 0 }
            let len = int("len"), offset = int("offset")
            let percent = len > 0 ? Int(Double(offset) / Double(len) * 100) : 100
            var text = "\(string("device")) \(string("status")) \(percent)% \(string("copy-mode"))"
            if case .bool(true)? = job["actively-synced"] { text += " actively-synced" }
            if string("io-status") != "ok" { text += " io-status \(string("io-status"))" }
            return text + " -> \(string("target"))"
        }
    }
}
