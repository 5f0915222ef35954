import ArgumentParser
import Foundation
import MirrorCore

extension Mirrorfs {
    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the mount's job in one line.",
            discussion: """
                The line shows the job's state, progress, bytes copied / still to copy / the image's size, \
                dirty bytes, the copy rate and the rate at which writes dirty clean regions (last 10 s), \
                the forecast time to go (h:mm:ss, or 'not converging'), the time since \
                the start, the speed limit and the target, and fits the terminal (COLUMNS): narrower \
                terminals get a shorter form. --watch redraws it in place and ends with a line that says \
                how the job ended.
                """)
        @Argument(help: "The mountpoint.") var mountpoint: String
        @Flag(help: "Print the job as JSON (query-block-jobs' object, or null).") var json = false
        @Flag(help: "Redraw until the job ends; exit non-zero if it failed.") var watch = false

        func run() throws {
            let client = try ControlClient(mountpoint: mountpoint)
            let imageSize = StatusLine.imageSize(in: mountpoint)
            guard watch else {
                let job = try client.currentJob()
                if json {
                    print(job?.compactText ?? "null")
                } else if let job {
                    print(StatusLine.render(job, imageSize: imageSize, width: StatusLine.width()) + StatusLine.server(mountpoint: mountpoint))
                } else {
                    print(StatusLine.noJob(mountpoint: mountpoint))
                }
                return
            }
            let terminal = isatty(STDOUT_FILENO) == 1 && !json
            var ending = JobEnding()
            var drew = false
            while true {
                let job = try client.currentJob()
                if json {
                    print(job?.compactText ?? "null")
                } else if let job {
                    let line = StatusLine.render(job, imageSize: imageSize, width: StatusLine.width())
                    // On a terminal the line is redrawn in place; otherwise one line per update.
                    if terminal { print("\r\u{1B}[2K" + line, terminator: "") } else { print(line) }
                    drew = true
                    ending.last = job
                }
                fflush(nil)
                if job == nil {
                    while let event = try client.nextEvent(timeout: 0) { ending.note(event) }
                    if terminal && drew { print("\r\u{1B}[2K", terminator: "") }
                    if !json {
                        // What the mount serves now tells a pivot from a cancel after ready.
                        var serving: String?
                        for _ in 0..<3 where serving == nil {
                            serving = try? ControlClient.rootAttribute(RootAttribute.serving, of: mountpoint, deadline: 5)
                        }
                        if let closing = try ending.closingLine(mountpoint: mountpoint, serving: serving) {
                            print(closing)
                        } else if !drew {
                            print(StatusLine.noJob(mountpoint: mountpoint))
                        }
                    } else if let error = ending.error {
                        throw CLIError("the job failed: \(error)")
                    }
                    fflush(nil)
                    return
                }
                // Between redraws, read events: how the job ends shows only there.
                let deadline = Date().addingTimeInterval(0.5)
                while let event = try client.nextEvent(timeout: max(0, deadline.timeIntervalSinceNow)) {
                    ending.note(event)
                    if deadline.timeIntervalSinceNow <= 0 { break }
                }
            }
        }
    }
}

/// How a watched job ended, from its final events.
struct JobEnding {
    var last: JSONValue?
    private var completedAt: Int64?
    private var cancelledAt: Int64?
    private(set) var error: String?

    mutating func note(_ event: JSONValue) {
        guard case .string(let name)? = event["event"] else { return }
        let time: Int64? = { if case .int(let s)? = event["timestamp"]?["seconds"] { return s }; return nil }()
        switch name {
        case "BLOCK_JOB_COMPLETED":
            if case .string(let e)? = event["data"]?["error"] { error = e }
            completedAt = time
        case "BLOCK_JOB_CANCELLED":
            cancelledAt = time
        default:
            break
        }
    }

    /// The line that closes `status --watch`; throws (the line as the error) when the job failed.
    func closingLine(mountpoint: String, serving: String?) throws -> String? {
        if let error { throw CLIError("the job failed: \(error)") }
        guard let last else { return nil }
        let target = { if case .string(let t)? = last["target"] { return t }; return "the target" }()
        let image = StatusLine.imageName(in: mountpoint).map { "\(mountpoint)/\($0)" } ?? mountpoint
        if let serving, serving == target {
            return "pivoted: \(image) now serves \(target)"
        }
        if let completedAt {
            // A cancel after ready completes without a pivot (QEMU): the target is a copy.
            return "cancelled: \(target) left consistent as of \(StatusLine.clock(completedAt)); \(image) serves \(serving ?? "the source")"
        }
        if cancelledAt != nil {
            return "cancelled: \(target) is left a partial copy; \(image) serves \(serving ?? "the source")"
        }
        return "the job ended; \(image) serves \(serving ?? "the source")"
    }
}

/// The human summary: one line that fits `width` columns, its parts dropped or shortened
/// (least useful first) until it does.
enum StatusLine {
    private struct Part {
        let priority: Int
        let long: String
        let short: String
        init(_ priority: Int, _ long: String, _ short: String? = nil) {
            self.priority = priority
            self.long = long
            self.short = short ?? long
        }
    }

    static func render(_ job: JSONValue, imageSize: UInt64?, width: Int) -> String {
        func string(_ key: String) -> String { if case .string(let s)? = job[key] { return s }; return "?" }
        func int(_ key: String) -> Int64 { if case .int(let n)? = job[key] { return n }; return 0 }
        func bool(_ key: String) -> Bool { if case .bool(let b)? = job[key] { return b }; return false }
        let len = int("len"), offset = int("offset"), remaining = max(len - offset, 0)
        let elapsed: Double = { if case .double(let d)? = job["elapsed-seconds"] { return d }; return Double(int("elapsed-seconds")) }()
        let fraction = len > 0 ? min(Double(offset) / Double(len), 1) : 1
        let percent = "\(Int(fraction * 100))%"
        let ready = bool("ready")
        var state = "\(string("device")): \(string("status"))"
        if bool("paused") && string("status") != "paused" { state += " (paused)" }
        if string("io-status") != "ok" { state += " io-status \(string("io-status"))" }
        let mode = string("copy-mode")
        var parts: [Part] = [
            Part(0, state),
            Part(0, percent),
        ]
        if bool("actively-synced") { parts.append(Part(1, "actively-synced", "synced")) }
        parts.append(Part(6, mode, mode == "write-blocking" ? "wb" : "bg"))
        let bar = 20
        let filled = Int(fraction * Double(bar))
        parts.append(Part(9, "[" + String(repeating: "#", count: filled) + String(repeating: "-", count: bar - filled) + "]"))
        let sizeText = imageSize.map { " / size \(bytes(Int64($0)))" } ?? ""
        parts.append(Part(3, "copied \(bytes(offset)) / to copy \(bytes(remaining))\(sizeText)",
                          "\(short(offset))/\(short(len))"))
        parts.append(Part(5, "dirty \(bytes(int("dirty-bytes")))", "dirty \(short(int("dirty-bytes")))"))
        // The daemon's forecast (SPEC 10): rates over its last 10 s, and the time to go.
        let copyRate = int("copy-rate"), dirtyRate = int("dirty-rate")
        parts.append(Part(2, "copy \(bytes(copyRate))/s, dirty \(bytes(dirtyRate))/s", "\(short(copyRate))/s"))
        if !ready {
            let eta: String
            switch job["eta-seconds"] {
            case .double(let seconds)?: eta = duration(seconds)
            case .int(let seconds)?: eta = duration(Double(seconds))
            default: eta = bool("converging") ? "-:--:--" : "not converging"
            }
            parts.append(Part(1, "eta " + eta))
        }
        parts.append(Part(4, "elapsed \(duration(elapsed))", duration(elapsed)))
        let speed = int("speed")
        parts.append(Part(7, speed > 0 ? "limit \(bytes(speed))/s" : "no limit", speed > 0 ? "max \(short(speed))/s" : nil))
        parts.append(Part(8, "-> \(string("target"))", "-> \(URL(fileURLWithPath: string("target")).lastPathComponent)"))
        if case .string(let error)? = job["error"] { parts.append(Part(0, "error: \(error)")) }
        return fit(parts, width: width)
    }

    /// Every part in its long form if that fits; else the least useful parts take their
    /// short form, then go, until the line fits; a line still too long is cut.
    private static func fit(_ parts: [Part], width: Int) -> String {
        let limit = max(width - 1, 10)  // never the last column: no terminal wraps the line
        var forms: [String?] = parts.map(\.long)
        func line() -> String { forms.compactMap { $0 }.joined(separator: "  ") }
        let leastUseful = parts.indices.sorted { parts[$0].priority > parts[$1].priority }
        for index in leastUseful where line().count > limit { forms[index] = parts[index].short }
        for index in leastUseful where line().count > limit && parts[index].priority > 0 { forms[index] = nil }
        // Room left: the most useful parts get their long form back, as far as it fits.
        for index in leastUseful.reversed() where forms[index] != nil && forms[index] != parts[index].long {
            let short = forms[index]
            forms[index] = parts[index].long
            if line().count > limit { forms[index] = short }
        }
        let text = line()
        return text.count <= limit ? text : String(text.prefix(limit - 3)) + "..."
    }

    static func noJob(mountpoint: String) -> String {
        let serving = try? ControlClient.rootAttribute(RootAttribute.serving, of: mountpoint)
        let image = imageName(in: mountpoint).map { "\(mountpoint)/\($0)" } ?? mountpoint
        return "no job; \(image) serves \(serving ?? "its source")" + server(mountpoint: mountpoint)
    }

    /// "; server pid P, N restarts" when the mount's server was ever replaced.
    static func server(mountpoint: String) -> String {
        guard let restarts = (try? ControlClient.rootAttribute(RootAttribute.restarts, of: mountpoint)).flatMap(Int.init), restarts > 0,
              let pid = try? ControlClient.rootAttribute(RootAttribute.pid, of: mountpoint) else { return "" }
        return "; server pid \(pid), \(restarts) restart\(restarts == 1 ? "" : "s")"
    }

    /// The terminal's width, asked at every redraw (a resized window gets a line that fits);
    /// without a terminal, COLUMNS; else unlimited.
    static func width() -> Int {
        var size = winsize()
        if ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 0 { return Int(size.ws_col) }
        if let columns = ProcessInfo.processInfo.environment["COLUMNS"].flatMap(Int.init), columns > 0 { return columns }
        return Int.max / 2
    }

    static func imageName(in mountpoint: String) -> String? {
        (try? FileManager.default.contentsOfDirectory(atPath: mountpoint))?.first { $0 != ".status" }
    }

    static func imageSize(in mountpoint: String) -> UInt64? {
        guard let name = imageName(in: mountpoint) else { return nil }
        var st = stat()
        return stat(mountpoint + "/" + name, &st) == 0 ? UInt64(st.st_size) : nil
    }

    /// h:mm:ss
    static func duration(_ seconds: Double) -> String {
        guard seconds.isFinite, seconds >= 0, seconds < 1e7 else { return "-:--:--" }
        let total = Int(seconds.rounded())
        return String(format: "%d:%02d:%02d", total / 3600, total / 60 % 60, total % 60)
    }

    static func clock(_ seconds: Int64) -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss"
        return formatter.string(from: Date(timeIntervalSince1970: Double(seconds)))
    }

    static func bytes(_ n: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var value = Double(n), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
    }

    /// 1.2G, 512M, 37K: for narrow terminals.
    static func short(_ n: Int64) -> String {
        let units = ["", "K", "M", "G", "T", "P", "E"]
        var value = Double(n), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(n)" : String(format: value < 10 ? "%.1f%@" : "%.0f%@", value, units[unit])
    }
}
