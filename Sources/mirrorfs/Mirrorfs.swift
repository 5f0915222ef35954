import ArgumentParser
import Foundation

/// The root command only configures; each subcommand lives in its own file.
struct Mirrorfs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mirrorfs",
        abstract: "Serve a raw disk image through FUSE and mirror it live to a target image.",
        version: "\(BuildInfo.version) (commit \(BuildInfo.commit))",
        subcommands: [Mount.self, Status.self, Job.self, Unmount.self, Restart.self, List.self]
    )
}

/// A problem found by the CLI itself: printed as `mirrorfs: error: <description>`.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

extension Mirrorfs {
    static func runReportingOneLineErrors() -> Never {
        do {
            var command = try parseAsRoot()
            try command.run()
            Log.drain()
            Foundation.exit(0)
        } catch {
            let code = exitCode(for: error)
            if code == .success { exit(withError: error) }  // --help, --version
            let message = (error as? CLIError)?.description ?? Self.message(for: error)
            let oneLine = message.split(whereSeparator: \.isNewline).first.map(String.init) ?? "failed"
            Log.drain()
            writeStandardError("mirrorfs: error: \(oneLine)\n")
            Foundation.exit(code.rawValue == 0 ? 1 : code.rawValue)
        }
    }
}
