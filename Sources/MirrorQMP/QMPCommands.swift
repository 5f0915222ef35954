import Foundation
import Glibc
import MirrorCore
import MirrorNBD
import MirrorSetup
import SystemPackage
import Synchronization

/// A QMP error: QEMU's class and text.
public struct QMPError: Error, Equatable {
    public let errorClass: String
    public let desc: String

    static func generic(_ desc: String) -> QMPError { QMPError(errorClass: "GenericError", desc: desc) }
    static func commandNotFound(_ desc: String) -> QMPError { QMPError(errorClass: "CommandNotFound", desc: desc) }
    static func deviceNotActive(_ id: String) -> QMPError {
        QMPError(errorClass: "DeviceNotActive", desc: "Block job '\(id)' not found")
    }

    func reply(id: JSONValue?) -> JSONValue {
        var members: [(String, JSONValue)] = [("error", .object([("class", .string(errorClass)), ("desc", .string(desc))]))]
        if let id { members.append(("id", id)) }
        return .object(members)
    }
}

/// Per-connection protocol state.
struct QMPSession {
    var negotiated = false
    var quitRequested = false
}

/// One argument of a command's schema.
struct Parameter {
    enum Kind {
        case string, int, bool, stringList
        case enumeration([String])
    }
    let name: String
    let kind: Kind
    let required: Bool

    static func req(_ name: String, _ kind: Kind) -> Parameter { Parameter(name: name, kind: kind, required: true) }
    static func opt(_ name: String, _ kind: Kind) -> Parameter { Parameter(name: name, kind: kind, required: false) }
}

/// Arguments checked against a command's schema.
struct Arguments {
    let values: [String: JSONValue]
    func string(_ key: String) -> String? { if case .string(let s)? = values[key] { return s }; return nil }
    func int(_ key: String) -> Int64? { if case .int(let n)? = values[key] { return n }; return nil }
    func bool(_ key: String) -> Bool? { if case .bool(let b)? = values[key] { return b }; return nil }
}

/// The command table: name → schema and handler, run against the mount's filter.
public final class QMPCommands: Sendable {
    public static let qemuVersion = (major: 8, minor: 2, micro: 0)
    public let package: String
    private let filter: MirrorFilter
    /// The job-setup path `mount --target` uses too.
    private let setup: JobSetup
    private var imageName: String { setup.imageName }
    private let onQuit: @Sendable () -> Void
    /// The request deadline of NBD targets that drive-mirror opens.
    private let nbdTimeout: Double
    /// The daemon's log.
    private let log: @Sendable (String) -> Void
    /// QEMU's rule for downstream extensions: `__RFQDN_name`.
    public static let extensionPrefix = QAPIExtension.prefix

    private struct Command {
        let parameters: [Parameter]
        let handler: @Sendable (QMPCommands, Arguments) throws(QMPError) -> JSONValue
    }

    /// A block-job-* verb: the job is named by `key` (`device` or `id`); an unknown one is
    /// DeviceNotActive.
    private static func blockJobVerb(_ key: Parameter, _ more: [Parameter] = [],
                                     _ verb: @escaping @Sendable (MirrorJob, Arguments) throws(JobError) -> Void) -> Command {
        Command(parameters: [key] + more) { c, a throws(QMPError) in
            let job = try c.blockJob(a.string(key.name)!)
            return try c.run { () throws(JobError) in try verb(job, a) }
        }
    }

    /// A job-* verb: the job is named by `id`; an unknown one is GenericError "Job not found".
    private static func jobVerb(_ verb: @escaping @Sendable (MirrorJob) throws(JobError) -> Void) -> Command {
        Command(parameters: [.req("id", .string)]) { c, a throws(QMPError) in
            let job = try c.anyJob(a.string("id")!)
            return try c.run { () throws(JobError) in try verb(job) }
        }
    }
    private let table: [String: Command]
    /// Run after every command (the server keeps its record of the job current).
    private let afterCommand: @Sendable () -> Void

    public init(filter: MirrorFilter, setup: JobSetup, package: String,
                nbdTimeout: Double = NBDBlockDevice.defaultTimeout, log: @escaping @Sendable (String) -> Void = { _ in },
                onQuit: @escaping @Sendable () -> Void, afterCommand: @escaping @Sendable () -> Void = {}) {
        self.afterCommand = afterCommand
        self.filter = filter
        self.setup = setup
        self.nbdTimeout = nbdTimeout
        self.package = package
        self.log = log
        self.onQuit = onQuit
        let ext = Self.extensionPrefix
        let device = Parameter.req("device", .string)
        let id = Parameter.req("id", .string)
        let errorPolicy = Parameter.Kind.enumeration(["report", "ignore", "enospc", "stop", "auto"])
        table = [
            "qmp_capabilities": Command(parameters: [.opt("enable", .stringList)]) { _, _ in .object([]) },
            "query-version": Command(parameters: []) { c, _ in c.versionValue() },
            "query-commands": Command(parameters: []) { c, _ in
                .array(c.table.keys.sorted().map { .object([("name", .string($0))]) })
            },
            "query-block-jobs": Command(parameters: []) { c, _ in
                .array(c.filter.job.map { [$0.info().jsonValue] } ?? [])
            },
            "query-jobs": Command(parameters: []) { c, _ in
                .array(c.filter.job.map { [$0.jobInfo().jsonValue] } ?? [])
            },
            "drive-mirror": Command(parameters: [
                .opt("job-id", .string), device, .req("target", .string), .opt("format", .string),
                .opt("node-name", .string), .opt("replaces", .string),
                .req("sync", .enumeration(["top", "full", "none", "incremental", "bitmap"])),
                .opt("mode", .enumeration(["existing", "absolute-paths"])), .opt("speed", .int),
                .opt("granularity", .int), .opt("buf-size", .int), .opt("on-source-error", errorPolicy),
                .opt("on-target-error", errorPolicy), .opt("unmap", .bool),
                .opt("copy-mode", .enumeration(["background", "write-blocking"])),
                .opt("auto-finalize", .bool), .opt("auto-dismiss", .bool),
                .opt(ext + "state-dir", .string), .opt(ext + "auto-write-blocking", .int),
            ]) { c, a throws(QMPError) in try c.driveMirror(a) },
            // A failed job's log, kept marking writes, is dropped (the CLI's `job cancel` then).
            ext + "discard-dirty-log": Command(parameters: []) { c, _ throws(QMPError) in
                guard let log = c.filter.discardFailedJobLog() else { throw .generic("No dirty log of a failed job is kept") }
                c.log("discarded the dirty log \(log.path) of the failed job")
                return .object([("dirty-log", .string(log.path)), ("target", .string(log.targetName))])
            },
            "block-job-change": Self.blockJobVerb(id, [.req("type", .enumeration(["commit", "stream", "mirror", "backup", "create", "amend", "snapshot-load", "snapshot-save", "snapshot-delete"])),
                                                  .req("copy-mode", .enumeration(["background", "write-blocking"]))]) { job, a throws(JobError) in
                try job.change(copyMode: CopyMode(rawValue: a.string("copy-mode")!)!)
            },
            "block-job-complete": Self.blockJobVerb(device) { job, _ throws(JobError) in try job.complete() },
            "block-job-cancel": Self.blockJobVerb(device, [.opt("force", .bool)]) { job, a throws(JobError) in
                try job.cancel(force: a.bool("force") ?? false)
            },
            "block-job-pause": Self.blockJobVerb(device) { job, _ throws(JobError) in try job.pause() },
            "block-job-resume": Self.blockJobVerb(device) { job, _ throws(JobError) in try job.resume() },
            "block-job-set-speed": Self.blockJobVerb(device, [.req("speed", .int)]) { job, a throws(JobError) in
                try job.setSpeed(a.int("speed")!)
            },
            "block-job-dismiss": Self.blockJobVerb(id) { job, _ throws(JobError) in try job.dismiss() },
            "block-job-finalize": Self.blockJobVerb(id) { job, _ throws(JobError) in try job.finalize() },
            "job-pause": Self.jobVerb { job throws(JobError) in try job.pause() },
            "job-resume": Self.jobVerb { job throws(JobError) in try job.resume() },
            // job-cancel always force-cancels (QEMU).
            "job-cancel": Self.jobVerb { job throws(JobError) in try job.cancel(force: true) },
            "job-complete": Self.jobVerb { job throws(JobError) in try job.complete() },
            "job-dismiss": Self.jobVerb { job throws(JobError) in try job.dismiss() },
            "job-finalize": Self.jobVerb { job throws(JobError) in try job.finalize() },
            "quit": Command(parameters: []) { _, _ in .object([]) },
        ]
    }

    /// Commands that act on the job (the others only read).
    private static func changesState(_ name: String) -> Bool {
        !name.hasPrefix("query-") && name != "qmp_capabilities"
    }

    private static func describe(_ arguments: [(String, JSONValue)]) -> String {
        arguments.map { "\($0.0) \($0.1.compactText)" }.joined(separator: ", ")
    }

    /// What a command that succeeded did, for the daemon's log.
    private static func sentence(for name: String, _ arguments: [(String, JSONValue)]) -> String? {
        func argument(_ key: String) -> String {
            switch arguments.first(where: { $0.0 == key })?.1 {
            case .string(let s)?: s
            case let value?: value.compactText
            case nil: "?"
            }
        }
        let job = arguments.first { $0.0 == "device" || $0.0 == "id" }.map { _ in
            argument(arguments.contains { $0.0 == "device" } ? "device" : "id")
        } ?? "the job"
        switch name {
        case "block-job-change":
            return "job '\(job)' switched to \(argument("copy-mode")): from now on every write reaches the target before it is acknowledged"
        case "block-job-complete", "job-complete":
            return "asked to complete job '\(job)': it pivots once source and target are equal"
        case "block-job-cancel":
            return "asked to cancel job '\(job)'\(argument("force") == "true" ? " at once (force)" : "")"
        case "job-cancel":
            return "asked to cancel job '\(job)' at once"
        case "block-job-pause", "job-pause":
            return "asked to pause job '\(job)'"
        case "block-job-resume", "job-resume":
            return "asked to resume job '\(job)'"
        case "block-job-set-speed":
            let speed = argument("speed")
            return "job '\(job)' copy limit set to \(speed == "0" ? "none" : speed + " bytes/s")"
        case "block-job-dismiss", "block-job-finalize", "job-dismiss", "job-finalize":
            return "\(name) of job '\(job)' done"
        case "quit":
            return "asked to quit: unmounting"
        default:
            return nil
        }
    }

    func greeting() -> JSONValue {
        .object([("QMP", .object([("version", versionValue()), ("capabilities", .array([]))]))])
    }

    private func versionValue() -> JSONValue {
        .object([("qemu", .object([("micro", .int(Int64(Self.qemuVersion.micro))), ("minor", .int(Int64(Self.qemuVersion.minor))),
                                   ("major", .int(Int64(Self.qemuVersion.major)))])),
                 ("package", .string(package))])
    }

    func quit() { onQuit() }

    // MARK: - Dispatch

    /// Handles one framed input value; returns the reply (nil: none).
    /// Commands being handled, and whether the mount is ending (then none is taken).
    private let activity = Mutex<(running: Int, closed: Bool)>((0, false))

    /// The mount ends: no command runs from now on, and those running have finished when
    /// this returns (bounded: 30 s), so nothing starts or ends a job behind the clean stop.
    public func close() {
        activity.withLock { $0.closed = true }
        let deadline = monotonicSeconds() + 30
        while activity.withLock({ $0.running }) > 0 && monotonicSeconds() < deadline { usleep(1000) }
    }

    private func monotonicSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }

    func handle(_ frame: [UInt8], session: inout QMPSession) -> JSONValue? {
        let admitted = activity.withLock { a -> Bool in
            guard !a.closed else { return false }
            a.running += 1
            return true
        }
        guard admitted else { return QMPError.generic("The mount is ending: no command is taken").reply(id: nil) }
        defer { activity.withLock { $0.running -= 1 } }
        defer { afterCommand() }
        return dispatch(frame, session: &session)
    }

    private func dispatch(_ frame: [UInt8], session: inout QMPSession) -> JSONValue? {
        let message: JSONValue
        do {
            message = try QMPJSONParser.parse(frame)
        } catch {
            return QMPError.generic("JSON parse error, expecting value").reply(id: nil)
        }
        guard case .object(let members) = message else {
            return QMPError.generic("QMP input must be a JSON object").reply(id: nil)
        }
        let id = message["id"]
        for (key, _) in members where !["execute", "exec-oob", "arguments", "id"].contains(key) {
            return QMPError.generic("QMP input member '\(key)' is unexpected").reply(id: id)
        }
        if message["exec-oob"] != nil {
            return QMPError.generic("Out-of-band execution is not enabled for this connection").reply(id: id)
        }
        guard let execute = message["execute"] else {
            return QMPError.generic("QMP input lacks member 'execute'").reply(id: id)
        }
        guard case .string(let name) = execute else {
            return QMPError.generic("QMP input member 'execute' must be a string").reply(id: id)
        }
        var arguments: [(String, JSONValue)] = []
        if let given = message["arguments"] {
            guard case .object(let a) = given else {
                return QMPError.generic("QMP input member 'arguments' must be an object").reply(id: id)
            }
            arguments = a
        }
        if !session.negotiated && name != "qmp_capabilities" {
            return QMPError.commandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'").reply(id: id)
        }
        if session.negotiated && name == "qmp_capabilities" {
            return QMPError.commandNotFound("Capabilities negotiation is already complete, command ignored").reply(id: id)
        }
        guard let command = table[name] else {
            return QMPError.commandNotFound("The command \(name) has not been found").reply(id: id)
        }
        do throws(QMPError) {
            let checked = try Self.check(arguments, against: command.parameters)
            if name == "qmp_capabilities", case .array(let wanted)? = checked.values["enable"], let first = wanted.first,
               case .string(let capability) = first {
                throw QMPError.generic("Capability \(capability) not available")
            }
            let value: JSONValue
            do {
                value = try command.handler(self, checked)
            } catch {
                if Self.changesState(name) { log("refused \(name) (\(Self.describe(arguments))): \(error.desc)") }
                throw error
            }
            if let sentence = Self.sentence(for: name, arguments) { log(sentence) }
            if name == "qmp_capabilities" { session.negotiated = true }
            if name == "quit" { session.quitRequested = true }
            var reply: [(String, JSONValue)] = [("return", value)]
            if let id { reply.append(("id", id)) }
            return .object(reply)
        } catch {
            return error.reply(id: id)
        }
    }

    /// QEMU's input-visitor checks, before the command has any effect.
    static func check(_ given: [(String, JSONValue)], against schema: [Parameter]) throws(QMPError) -> Arguments {
        var values: [String: JSONValue] = [:]
        for (key, value) in given {
            guard let parameter = schema.first(where: { $0.name == key }) else {
                throw .generic("Parameter '\(key)' is unexpected")
            }
            switch (parameter.kind, value) {
            case (.string, .string), (.int, .int), (.bool, .bool): break
            case (.stringList, .array(let items)) where items.allSatisfy({ if case .string = $0 { true } else { false } }): break
            case (.enumeration(let allowed), .string(let s)):
                guard allowed.contains(s) else { throw .generic("Parameter '\(key)' does not accept value '\(s)'") }
            default:
                let expected = switch parameter.kind {
                case .string, .enumeration: "string"
                case .int: "integer"
                case .bool: "boolean"
                case .stringList: "array"
                }
                throw .generic("Invalid parameter type for '\(key)', expected: \(expected)")
            }
            values[key] = value
        }
        for parameter in schema where parameter.required && values[parameter.name] == nil {
            throw .generic("Parameter '\(parameter.name)' is missing")
        }
        return Arguments(values: values)
    }

    // MARK: - Jobs

    private func blockJob(_ id: String) throws(QMPError) -> MirrorJob {
        guard let job = filter.job, job.id == id else { throw .deviceNotActive(id) }
        return job
    }

    private func anyJob(_ id: String) throws(QMPError) -> MirrorJob {
        guard let job = filter.job, job.id == id else { throw .generic("Job not found") }
        return job
    }

    private func run(_ verb: () throws(JobError) -> Void) throws(QMPError) -> JSONValue {
        do { try verb() } catch { throw .generic(error.description) }
        return .object([])
    }

    private func driveMirror(_ a: Arguments) throws(QMPError) -> JSONValue {
        let device = a.string("device")!
        guard device == imageName else {
            throw .generic("Cannot find device='\(device)' nor node-name='\(device)'")
        }
        if let format = a.string("format"), format != "raw" {
            throw .generic("Unknown target format '\(format)': only 'raw' is supported")
        }
        if a.string("replaces") != nil || a.string("node-name") != nil {
            throw .generic("Parameters 'replaces' and 'node-name' are not supported")
        }
        let sync: SyncMode
        switch a.string("sync")! {
        case "full", "top": sync = .full  // a raw image has no backing file: top is full
        case "none": sync = .none
        case let other: throw .generic("Sync mode '\(other)' not supported")
        }
        var options = MirrorOptions(jobID: a.string("job-id") ?? imageName)
        if let jobID = a.string("job-id") {
            do { try MirrorOptions.validate(jobID: jobID) } catch { throw .generic(error.description) }
        }
        options.sync = sync
        if let speed = a.int("speed") {
            guard speed >= 0 else { throw .generic("Parameter 'speed' expects a non-negative value") }
            options.speed = UInt64(speed)
        }
        if let granularity = a.int("granularity"), granularity != 0 {
            guard granularity > 0 else { throw .generic("Parameter 'granularity' expects a value in range [512B, 64MB]") }
            options.granularity = UInt64(granularity)
        }
        if let bufSize = a.int("buf-size") {
            guard bufSize >= 0 else { throw .generic("Invalid parameter 'buf-size'") }
            if bufSize > 0 { options.bufSize = UInt64(bufSize) }
        }
        options.onSourceError = try Self.policy(a.string("on-source-error"))
        options.onTargetError = try Self.policy(a.string("on-target-error"))
        options.copyMode = a.string("copy-mode") == "write-blocking" ? .writeBlocking : .background
        options.autoFinalize = a.bool("auto-finalize") ?? true
        options.autoDismiss = a.bool("auto-dismiss") ?? true
        // Seconds a background job may go without converging before it switches itself to write-blocking.
        if let after = a.int(Self.extensionPrefix + "auto-write-blocking") {
            guard after > 0 else { throw .generic("Parameter '\(Self.extensionPrefix)auto-write-blocking' expects a number of seconds above 0") }
            options.autoWriteBlockingAfter = Double(after)
        }
        let mode: JobRequest.TargetMode = a.string("mode") == "existing" ? .existing : .create
        let request = JobRequest(target: a.string("target")!, mode: mode, options: options,
                                 stateDirectory: .init(argument: a.string(Self.extensionPrefix + "state-dir")),
                                 nbdTimeout: nbdTimeout)
        do {
            try setup.start(request, on: filter)
        } catch {
            throw .generic(error.description)
        }
        return .object([])
    }

    private static func policy(_ name: String?) throws(QMPError) -> ErrorPolicy {
        switch name {
        case nil, "report": return .report
        case "ignore": return .ignore
        case "stop": return .stop
        case let other?: throw .generic("Parameter 'on-error' does not accept value '\(other)' for a mirror job")
        }
    }
}
