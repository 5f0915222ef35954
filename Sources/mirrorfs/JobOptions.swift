import ArgumentParser
import Foundation
import MirrorCore

/// A byte count: plain bytes or with a K, M or G suffix (powers of 1024).
struct ByteCount: ExpressibleByArgument, Equatable {
    let bytes: UInt64

    init(bytes: UInt64) { self.bytes = bytes }

    init?(argument: String) {
        let text = argument.trimmingCharacters(in: .whitespaces)
        guard let last = text.last else { return nil }
        let shifts: [Character: UInt64] = ["K": 10, "k": 10, "M": 20, "m": 20, "G": 30, "g": 30]
        let (digits, shift) = shifts[last].map { (String(text.dropLast()), $0) } ?? (text, 0)
        // At most Int64.max: the size every QMP integer and file offset can carry.
        guard !digits.isEmpty, digits.allSatisfy(\.isASCII), digits.allSatisfy(\.isNumber), let value = UInt64(digits),
              value <= UInt64(Int64.max) >> shift else { return nil }
        bytes = value << shift
    }
}

extension CopyMode: ExpressibleByArgument {}
extension SyncMode: ExpressibleByArgument {}
extension ErrorPolicy: ExpressibleByArgument {}

/// The options of a mirror job, shared by `mount` and `job start`.
struct JobOptions: ParsableArguments {
    @Option(help: "Image to mirror to: a file (created sparse with the source's size if missing, reused if it has that size), nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH (an export of the source's size).")
    var target: String?
    @Option(help: "background, or write-blocking: writes reach the target before they are acknowledged.")
    var copyMode: CopyMode?
    @Option(help: "full: copy the whole image; none: only what is written from now on.")
    var sync: SyncMode?
    @Option(help: "Dirty-tracking granularity: a power of two from 512 to 64M (default 64K).")
    var granularity: ByteCount?
    @Option(help: "Copy buffer (default 16M).")
    var bufSize: ByteCount?
    @Option(help: "Background copy limit in bytes/s (0 = unlimited).")
    var speed: ByteCount?
    @Option(help: "report, ignore or stop.")
    var onSourceError: ErrorPolicy?
    @Option(help: "report, ignore or stop.")
    var onTargetError: ErrorPolicy?
    @Option(help: "The job's id (default: the image's file name).")
    var jobID: String?
    @Option(help: "Directory for the persistent dirty log (default: the target's directory; 'none': no log).")
    var stateDir: String?

    /// Whether any job option other than --target was given.
    var hasJobSettings: Bool {
        copyMode != nil || sync != nil || granularity != nil || bufSize != nil || speed != nil
            || onSourceError != nil || onTargetError != nil || jobID != nil || stateDir != nil
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
        try rethrowing { () throws(JobError) in try options.validate() }
        return options
    }
}

/// Turns a JobError into the CLI's one-line error.
func rethrowing(_ body: () throws(JobError) -> Void) throws {
    do { try body() } catch { throw CLIError(error.description) }
}
