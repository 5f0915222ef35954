import ArgumentParser
import Foundation
import MirrorCore

extension Mirrorfs {
    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the mount's job.")
        @Argument(help: "The mountpoint.") var mountpoint: String
        @Flag(help: "Print the job as JSON (query-block-jobs' object, or null).") var json = false
        @Flag(help: "Redraw until the job ends; exit non-zero if it failed.") var watch = false

        func run() throws {
            let client = try ControlClient(mountpoint: mountpoint)
            guard watch else {
                let job = try client.currentJob()
                print(json ? (job?.compactText ?? "null") : StatusLine.render(job, rate: nil))
                return
            }
            let terminal = isatty(STDOUT_FILENO) == 1
            var last: (time: Double, offset: Int64)?
            var failure: String?
            while true {
                let job = try client.currentJob()
                let now = Date().timeIntervalSince1970
                var rate: Double?
                if case .int(let offset)? = job?["offset"] {
                    if let last, now > last.time { rate = Double(offset - last.offset) / (now - last.time) }
                    last = (now, offset)
                }
                let line = json ? (job?.compactText ?? "null") : StatusLine.render(job, rate: rate)
                // On a terminal the line is redrawn in place; otherwise one line per update.
                print(terminal && !json ? "\r\u{1B}[2K" + line : line, terminator: terminal && !json ? "" : "\n")
                fflush(nil)
                if job == nil {
                    if terminal && !json { print() }
                    if let failure { throw CLIError("the job failed: \(failure)") }
                    return
                }
                // Between redraws, read events: a failed end shows only there.
                let deadline = Date().timeIntervalSince1970 + 0.5
                while let event = try client.nextEvent(timeout: max(0, deadline - Date().timeIntervalSince1970)) {
                    if case .string("BLOCK_JOB_COMPLETED")? = event["event"], case .string(let e)? = event["data"]?["error"] {
                        failure = e
                    }
                    if Date().timeIntervalSince1970 >= deadline { break }
                }
            }
        }
    }
}

/// The human summary: state, copy mode, progress bar, bytes, rate, remaining time, actively-synced.
enum StatusLine {
    static func render(_ job: JSONValue?, rate: Double?) -> String {
        guard let job else { return "no job" }
        func string(_ key: String) -> String { if case .string(let s)? = job[key] { return s }; return "?" }
        func int(_ key: String) -> Int64 { if case .int(let n)? = job[key] { return n }; return 0 }
        func bool(_ key: String) -> Bool { if case .bool(let b)? = job[key] { return b }; return false }
        let len = int("len"), offset = int("offset")
        let fraction = len > 0 ? min(Double(offset) / Double(len), 1) : 1
        let width = 24
        let filled = Int(fraction * Double(width))
        let bar = "[" + String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled) + "]"
        var parts = [
            "\(string("device")): \(string("status"))", string("copy-mode"),
            "\(bar) \(Int(fraction * 100))% \(bytes(offset))/\(bytes(len))",
        ]
        if let rate, rate > 0 {
            parts.append("\(bytes(Int64(rate)))/s")
            parts.append("eta \(Int(Double(max(len - offset, 0)) / rate))s")
        }
        parts.append("actively-synced: \(bool("actively-synced"))")
        if string("io-status") != "ok" { parts.append("io-status: \(string("io-status"))") }
        if case .string(let error)? = job["error"] { parts.append("error: \(error)") }
        return parts.joined(separator: "  ")
    }

    static func bytes(_ n: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
    }
}
