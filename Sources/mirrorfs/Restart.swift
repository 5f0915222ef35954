import ArgumentParser
import Foundation
import MirrorCore
import MirrorSetup

extension Mirrorfs {
    struct Restart: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Hand a mount over to a new server started from the binary on disk (an upgrade).",
            discussion: """
                The mount's keeper runs its own binary again, keeping the FUSE connection; the \
                serving daemon stops taking requests, finishes those it has and records its job; \
                a new server takes the connection over, has the kernel resend what was waiting, \
                and resumes the job. Programs using the image see a pause, not an error. Returns \
                once the new server answers.
                """)

        @Argument(help: "The mountpoint.") var mountpoint: String
        @Option(help: "Seconds to wait for the new server.") var timeout: Double = 30

        func run() throws {
            guard timeout > 0 && timeout <= 3600 else { throw CLIError("--timeout must be more than 0 and at most 3600 seconds") }
            guard MountTable.isMirrorfsMount(URL(fileURLWithPath: mountpoint).standardizedFileURL.path) else {
                throw CLIError("'\(mountpoint)' is not a mirrorfs mount")
            }
            let old = try ControlClient.rootAttribute(RootAttribute.pid, of: mountpoint)
            let restarts = Int(try ControlClient.rootAttribute(RootAttribute.restarts, of: mountpoint)) ?? 0
            guard let keeper = try? ControlClient.rootAttribute(RootAttribute.keeper, of: mountpoint), let pid = pid_t(keeper) else {
                throw CLIError("'\(mountpoint)' has no keeper (its daemon runs without mirrorfs-keeper): it cannot be handed over; unmount and mount it again")
            }
            guard kill(pid, SIGUSR1) == 0 else {
                throw CLIError("cannot signal the keeper (pid \(pid)) of '\(mountpoint)': \(String(cString: strerror(errno)))")
            }
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                if case .value(let now) = MountTable.readRootAttribute(RootAttribute.pid, of: mountpoint, timeout: 2), now != old,
                   let count = MountTable.rootAttribute(RootAttribute.restarts, of: mountpoint, timeout: 2).flatMap(Int.init), count > restarts {
                    print("'\(mountpoint)' is served by a new server: pid \(now) (was \(old)), restart \(count)")
                    return
                }
                usleep(20_000)
            }
            throw CLIError("no new server answered '\(mountpoint)' within \(Int(timeout)) s; its log says why")
        }
    }
}
