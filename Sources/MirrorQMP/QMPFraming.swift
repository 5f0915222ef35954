import MirrorCore

/// Splits a QMP input stream into top-level JSON values. Clients (the `qemu.qmp` library
/// among them) send objects back to back with no newline, so framing follows brackets,
/// outside strings in either quote style, with escapes.
///
///     bytes:   {"execute":"a"}{"exec  ute":"b"}  [1]  garbage
///     frames:  └──── 1 ─────┘└────── 2 ──────┘  └3┘  └─ 4 ─┘ (3 and 4 are refused later)
struct QMPFramer {
    enum FramingError: Error, Equatable {
        /// A value grew past `maximumSize` before it ended.
        case tooLarge
    }

    let maximumSize: Int
    private var buffer: [UInt8] = []
    /// Bytes of `buffer` already scanned, and the scanner's state there.
    private var scanned = 0
    private var depth = 0
    private var quote: UInt8? = nil
    private var escaped = false
    private var inBareWord = false

    init(maximumSize: Int) { self.maximumSize = maximumSize }

    /// Appends input and returns every value it completes. Outside any bracket, other
    /// text runs to the next blank or bracket and is returned as its own frame (the
    /// dispatcher refuses it), so garbage never stalls the stream.
    mutating func feed(_ bytes: some Collection<UInt8>) throws(FramingError) -> [[UInt8]] {
        buffer.append(contentsOf: bytes)
        var frames: [[UInt8]] = []
        var start = 0
        while scanned < buffer.count {
            let byte = buffer[scanned]
            if let q = quote {
                if escaped { escaped = false } else if byte == UInt8(ascii: "\\") { escaped = true } else if byte == q { quote = nil }
                scanned += 1
                continue
            }
            let opens = byte == UInt8(ascii: "{") || byte == UInt8(ascii: "[")
            if inBareWord {
                if Self.isSpace(byte) || opens {
                    inBareWord = false
                    frames.append(Array(buffer[start..<scanned]))
                    start = scanned
                    continue  // rescan this byte at depth 0
                }
                scanned += 1
                continue
            }
            scanned += 1
            if depth == 0 {
                if opens {
                    start = scanned - 1
                    depth = 1
                } else if Self.isSpace(byte) {
                    start = scanned
                } else {
                    start = scanned - 1
                    inBareWord = true
                }
                continue
            }
            switch byte {
            case UInt8(ascii: "\""), UInt8(ascii: "'"):
                quote = byte
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth == 0 {
                    frames.append(Array(buffer[start..<scanned]))
                    start = scanned
                }
            default:
                break
            }
        }
        if start > 0 {
            buffer.removeFirst(start)
            scanned -= start
        }
        if buffer.count > maximumSize {
            buffer.removeAll()
            scanned = 0
            depth = 0
            quote = nil
            inBareWord = false
            throw .tooLarge
        }
        return frames
    }

    private static func isSpace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x0a || byte == 0x0d || byte == 0x09
    }
}

/// A JSON parser for QMP input: QEMU also accepts single-quoted strings; nesting is bounded.
public struct QMPJSONParser {
    public struct ParseError: Error {}
    static let maximumDepth = 64

    private let bytes: [UInt8]
    private var index = 0

    public static func parse(_ bytes: [UInt8]) throws(ParseError) -> JSONValue {
        var parser = QMPJSONParser(bytes: bytes)
        let value = try parser.value(depth: 0)
        parser.skipSpace()
        guard parser.index == bytes.count else { throw ParseError() }
        return value
    }

    private init(bytes: [UInt8]) { self.bytes = bytes }

    private mutating func skipSpace() {
        while index < bytes.count, [0x20, 0x0a, 0x0d, 0x09].contains(bytes[index]) { index += 1 }
    }

    private mutating func value(depth: Int) throws(ParseError) -> JSONValue {
        guard depth < Self.maximumDepth else { throw ParseError() }
        skipSpace()
        guard index < bytes.count else { throw ParseError() }
        switch bytes[index] {
        case UInt8(ascii: "{"):
            index += 1
            var members: [(String, JSONValue)] = []
            skipSpace()
            if index < bytes.count, bytes[index] == UInt8(ascii: "}") { index += 1; return .object(members) }
            while true {
                skipSpace()
                guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") || bytes[index] == UInt8(ascii: "'") else { throw ParseError() }
                let key = try string()
                skipSpace()
                guard index < bytes.count, bytes[index] == UInt8(ascii: ":") else { throw ParseError() }
                index += 1
                let v = try value(depth: depth + 1)
                if let existing = members.firstIndex(where: { $0.0 == key }) { members[existing].1 = v } else { members.append((key, v)) }
                skipSpace()
                guard index < bytes.count else { throw ParseError() }
                if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
                if bytes[index] == UInt8(ascii: "}") { index += 1; return .object(members) }
                throw ParseError()
            }
        case UInt8(ascii: "["):
            index += 1
            var items: [JSONValue] = []
            skipSpace()
            if index < bytes.count, bytes[index] == UInt8(ascii: "]") { index += 1; return .array(items) }
            while true {
                items.append(try value(depth: depth + 1))
                skipSpace()
                guard index < bytes.count else { throw ParseError() }
                if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
                if bytes[index] == UInt8(ascii: "]") { index += 1; return .array(items) }
                throw ParseError()
            }
        case UInt8(ascii: "\""), UInt8(ascii: "'"):
            return .string(try string())
        default:
            return try literal()
        }
    }

    private mutating func literal() throws(ParseError) -> JSONValue {
        let start = index
        while index < bytes.count, !",]} \n\r\t:".utf8.contains(bytes[index]) { index += 1 }
        let word = String(decoding: bytes[start..<index], as: UTF8.self)
        switch word {
        case "true": return .bool(true)
        case "false": return .bool(false)
        case "null": return .null
        default:
            if let n = Int64(word) { return .int(n) }
            if word.contains(where: { $0 == "." || $0 == "e" || $0 == "E" }), let d = Double(word) { return .double(d) }
            throw ParseError()
        }
    }

    private mutating func string() throws(ParseError) -> String {
        let quote = bytes[index]
        index += 1
        var out: [UInt8] = []
        while index < bytes.count {
            let byte = bytes[index]
            index += 1
            if byte == quote { return String(decoding: out, as: UTF8.self) }
            guard byte == UInt8(ascii: "\\") else { out.append(byte); continue }
            guard index < bytes.count else { throw ParseError() }
            let escape = bytes[index]
            index += 1
            switch escape {
            case UInt8(ascii: "n"): out.append(0x0a)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "r"): out.append(0x0d)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0c)
            case UInt8(ascii: "u"):
                guard index + 4 <= bytes.count,
                      let code = UInt32(String(decoding: bytes[index..<index + 4], as: UTF8.self), radix: 16) else { throw ParseError() }
                index += 4
                out.append(contentsOf: Array(String(Unicode.Scalar(code).map(Character.init) ?? "\u{FFFD}").utf8))
            default: out.append(escape)
            }
        }
        throw ParseError()
    }
}
