import ArgumentParser
import Foundation
import MirrorCore

/// A byte count: plain bytes, or with a suffix: K, M, G, T (also KiB, MiB, GiB, TiB:
/// powers of 1024) or kB, MB, GB, TB (powers of 1000).
struct ByteCount: ExpressibleByArgument, Equatable, CustomStringConvertible {
    let bytes: UInt64

    init(bytes: UInt64) { self.bytes = bytes }

    static let accepted = "plain bytes, or K/M/G/T and KiB/MiB/GiB/TiB (powers of 1024), kB/MB/GB/TB (powers of 1000)"

    struct Invalid: Error, CustomStringConvertible {
        let description: String
    }

    /// For `@Option(transform:)`: an invalid size says what is accepted.
    static func parse(_ argument: String) throws -> ByteCount {
        guard let count = ByteCount(argument: argument) else {
            throw Invalid(description: "not a size: use \(accepted), at most \(Int64.max) bytes")
        }
        return count
    }

    init?(argument: String) {
        let text = argument.trimmingCharacters(in: .whitespaces)
        let digits = String(text.prefix { $0.isASCII && $0.isNumber })
        let suffix = String(text.dropFirst(digits.count)).trimmingCharacters(in: .whitespaces)
        let scale: UInt64
        switch suffix {
        case "", "B": scale = 1
        case "K", "k", "KiB": scale = 1 << 10
        case "M", "m", "MiB": scale = 1 << 20
        case "G", "g", "GiB": scale = 1 << 30
        case "T", "t", "TiB": scale = 1 << 40
        case "kB", "KB": scale = 1_000
        case "MB": scale = 1_000_000
        case "GB": scale = 1_000_000_000
        case "TB": scale = 1_000_000_000_000
        default: return nil
        }
        // At most Int64.max: the size every QMP integer and file offset can carry.
        guard !digits.isEmpty, let value = UInt64(digits), value <= UInt64(Int64.max) / scale else { return nil }
        bytes = value * scale
    }

    var defaultValueDescription: String { description }

    var description: String {
        for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] where bytes >= 1 << shift && bytes % (1 << UInt64(shift)) == 0 {
            return "\(bytes >> UInt64(shift))\(suffix)"
        }
        return "\(bytes)"
    }
}

extension CopyMode: ExpressibleByArgument {}
extension SyncMode: ExpressibleByArgument {}
extension ErrorPolicy: ExpressibleByArgument {}

/// The options of a mirror job, shared by `mount` and `job start`.
struct JobOptions: ParsableArguments {
    @Option(help: "Image to mirror to: a file (created sparse with the source's size if missing, reused if it has that size), nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH (an export of the source's size).")
    var target: String?
    @Option(help: "background, or write-blocking: writes reach the target before they are acknowledged (default: background).")
    var copyMode: CopyMode?
    @Option(help: "full: copy the whole image; none: only what is written from now on (default: full).")
    var sync: SyncMode?
    @Option(help: "Dirty-tracking granularity: a power of two from 512 to 64M (default: 64K).", transform: ByteCount.parse)
    var granularity: ByteCount?
    @Option(help: "Copy buffer (default: 16M).", transform: ByteCount.parse)
    var bufSize: ByteCount?
    @Option(help: "Background copy limit in bytes/s; K/M/G/T, KiB..TiB, kB/MB/GB/TB (default: 0, unlimited).", transform: ByteCount.parse)
    var speed: ByteCount?
    @Option(help: "What a source read error does: report (the job fails), ignore (retry later) or stop (pause) (default: report).")
    var onSourceError: ErrorPolicy?
    @Option(help: "What a target write error does: report (the job fails), ignore (retry later) or stop (pause) (default: report).")
    var onTargetError: ErrorPolicy?
    @Flag(help: "A background job that does not converge (its copy does not gain on the writes) switches itself to write-blocking, so it reaches ready under any write load.")
    var autoWriteBlocking = false
    @Option(help: ArgumentHelp("Seconds without converging before --auto-write-blocking switches (implies it; default: 10).", valueName: "seconds"))
    var autoWriteBlockingAfter: Int?
    @Option(help: "The job's id (default: the image's file name).")
    var jobID: String?
    @Option(help: "Directory for the persistent dirty log (default: the target's directory; 'none': no log).")
    var stateDir: String?

    /// Whether any job option other than --target was given.
    var hasJobSettings: Bool {
        copyMode != nil || sync != nil || granularity != nil || bufSize != nil || speed != nil
            || onSourceError != nil || onTargetError != nil || jobID != nil || stateDir != nil
            || autoWriteBlocking || autoWriteBlockingAfter != nil
    }

    /// The job's options, checked with QEMU's rules and messages.
    func mirrorOptions(defaultJobID: String) throws -> MirrorOptions {
        var options = MirrorOptions(jobID: jobID ?? defaultJobID)
        if let jobID { try rethrowing { () throws(JobError) in try MirrorOptions.validate(jobID: jobID) } }
        options.copyMode = copyMode ?? .background
        options.sync = sync ?? .full
        options.granularity = granularity?.bytes ?? options.granularity
        if let bufSize {
            guard bufSize.bytes > 0 else { throw CLIError("Invalid parameter 'buf-size'") }
            options.bufSize = bufSize.bytes
        }
        options.speed = speed?.bytes ?? 0
        options.onSourceError = onSourceError ?? .report
        options.onTargetError = onTargetError ?? .report
        if let after = autoWriteBlockingAfter {
            guard after > 0 else { throw CLIError("--auto-write-blocking-after: '\(after)' is not a number of seconds above 0") }
            options.autoWriteBlockingAfter = Double(after)
        } else if autoWriteBlocking {
            options.autoWriteBlockingAfter = MirrorOptions.defaultAutoWriteBlockingAfter
        }
        try rethrowing { () throws(JobError) in try options.validate() }
        return options
    }
}

/// Turns a JobError into the CLI's one-line error.
func rethrowing(_ body: () throws(JobError) -> Void) throws {
    do { try body() } catch { throw CLIError(error.description) }
}
