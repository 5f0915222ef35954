import Foundation

/// BlockJobInfo for a mirror job, as query-block-jobs returns it (QAPI names via CodingKeys).
/// `.status/job.json` and QMP share this one type.
public struct BlockJobInfo: Codable, Sendable, Equatable {
    public var type = "mirror"
    public var device: String
    public var len: UInt64
    public var offset: UInt64
    public var busy: Bool
    public var paused: Bool
    public var speed: UInt64
    public var ioStatus: IOStatus
    public var ready: Bool
    public var status: JobStatus
    public var autoFinalize: Bool
    public var autoDismiss: Bool
    public var error: String?
    public var activelySynced: Bool
    // Members beyond QEMU's:
    public var copyMode: CopyMode
    public var dirtyBytes: UInt64

    enum CodingKeys: String, CodingKey {
        case type, device, len, offset, busy, paused, speed
        case ioStatus = "io-status"
        case ready, status
        case autoFinalize = "auto-finalize"
        case autoDismiss = "auto-dismiss"
        case error
        case activelySynced = "actively-synced"
        case copyMode = "copy-mode"
        case dirtyBytes = "dirty-bytes"
    }
}

extension BlockJobInfo {
    /// Compact JSON with QEMU's member names.
    public var jsonText: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes]
        return String(decoding: (try? encoder.encode(self)) ?? Data("null".utf8), as: UTF8.self)
    }
}

/// JobInfo, as query-jobs returns it.
public struct JobInfo: Codable, Sendable, Equatable {
    public var id: String
    public var type = "mirror"
    public var status: JobStatus
    public var currentProgress: UInt64
    public var totalProgress: UInt64
    public var error: String?

    enum CodingKeys: String, CodingKey {
        case id, type, status
        case currentProgress = "current-progress"
        case totalProgress = "total-progress"
        case error
    }
}

/// A QMP event: `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}`.
public struct JobEvent: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case statusChange(id: String, status: JobStatus)
        case ready(device: String, len: UInt64, offset: UInt64, speed: UInt64)
        case completed(device: String, len: UInt64, offset: UInt64, speed: UInt64, error: String?)
        case cancelled(device: String, len: UInt64, offset: UInt64, speed: UInt64)
        case error(device: String, operation: String, action: ErrorPolicy)
        case pending(id: String)
    }

    public let kind: Kind
    public let seconds: Int
    public let microseconds: Int

    public init(_ kind: Kind, at time: Date = Date()) {
        self.kind = kind
        let t = time.timeIntervalSince1970
        seconds = Int(t)
        microseconds = Int((t - Double(Int(t))) * 1e6)
    }

    public var name: String {
        switch kind {
        case .statusChange: "JOB_STATUS_CHANGE"
        case .ready: "BLOCK_JOB_READY"
        case .completed: "BLOCK_JOB_COMPLETED"
        case .cancelled: "BLOCK_JOB_CANCELLED"
        case .error: "BLOCK_JOB_ERROR"
        case .pending: "BLOCK_JOB_PENDING"
        }
    }

    /// The event's `data` member, in QEMU's member names.
    public var data: [String: JSONValue] {
        switch kind {
        case let .statusChange(id, status):
            return ["id": .string(id), "status": .string(status.rawValue)]
        case let .ready(device, len, offset, speed):
            return ["type": "mirror", "device": .string(device), "len": .int(len), "offset": .int(offset), "speed": .int(speed)]
        case let .completed(device, len, offset, speed, error):
            var data: [String: JSONValue] = ["type": "mirror", "device": .string(device), "len": .int(len),
                                             "offset": .int(offset), "speed": .int(speed)]
            if let error { data["error"] = .string(error) }
            return data
        case let .cancelled(device, len, offset, speed):
            return ["type": "mirror", "device": .string(device), "len": .int(len), "offset": .int(offset), "speed": .int(speed)]
        case let .error(device, operation, action):
            return ["device": .string(device), "operation": .string(operation), "action": .string(action.rawValue)]
        case let .pending(id):
            return ["type": "mirror", "id": .string(id)]
        }
    }

    /// One compact JSON line.
    public var jsonLine: String {
        let object: JSONValue = .object([
            "event": .string(name),
            "data": .object(data),
            "timestamp": .object(["seconds": .int(UInt64(max(seconds, 0))), "microseconds": .int(UInt64(max(microseconds, 0)))]),
        ])
        return object.compactText
    }
}

/// A minimal JSON value for event payloads whose member order is fixed by hand.
public indirect enum JSONValue: Sendable, Equatable, ExpressibleByStringLiteral {
    case string(String)
    case int(UInt64)
    case object([String: JSONValue])

    public init(stringLiteral value: String) { self = .string(value) }

    public var compactText: String {
        switch self {
        case .int(let n): return String(n)
        case .string(let s): return JSONValue.quote(s)
        case .object(let members):
            // "event" first, then "data", then "timestamp", then the rest sorted: stable output.
            let order = ["event", "data", "timestamp"]
            let keys = members.keys.sorted { a, b in
                let ia = order.firstIndex(of: a) ?? order.count, ib = order.firstIndex(of: b) ?? order.count
                return ia != ib ? ia < ib : a < b
            }
            return "{" + keys.map { JSONValue.quote($0) + ": " + members[$0]!.compactText }.joined(separator: ", ") + "}"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
