import Foundation
import Glibc

/// /proc/self/mountinfo, read to find mirrorfs mounts: by mountpoint, and by the device
/// number that files on them carry (st_dev).
public enum MountTable {
    public struct Entry: Equatable, Sendable {
        public let mountpoint: String
        public let major: UInt32
        public let minor: UInt32
        public let fileSystemType: String
        public let source: String
    }

    public static func entries() -> [Entry] {
        guard let table = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return [] }
        return table.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 4, let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else { return nil }
            let numbers = fields[2].split(separator: ":")
            guard numbers.count == 2, let major = UInt32(numbers[0]), let minor = UInt32(numbers[1]) else { return nil }
            return Entry(mountpoint: unescape(String(fields[4])), major: major, minor: minor,
                         fileSystemType: String(fields[dash + 1]), source: unescape(String(fields[dash + 2])))
        }
    }

    public static func mirrorfsMounts() -> [Entry] { entries().filter { $0.fileSystemType == "fuse.mirrorfs" } }

    public static func isMirrorfsMount(_ path: String) -> Bool {
        mirrorfsMounts().contains { $0.mountpoint == path }
    }

    /// The mirrorfs mount that a file with device number `device` lives on, if any.
    public static func mirrorfsMount(holdingDevice device: UInt64) -> Entry? {
        // glibc's major()/minor() encoding of dev_t.
        let major = UInt32(truncatingIfNeeded: ((device >> 8) & 0xfff) | ((device >> 32) & ~0xfff))
        let minor = UInt32(truncatingIfNeeded: (device & 0xff) | ((device >> 12) & ~0xff))
        return mirrorfsMounts().first { $0.major == major && $0.minor == minor }
    }

    /// Mount points escape spaces and the like as octal (\040).
    private static func unescape(_ field: String) -> String {
        var out = [UInt8]()
        var bytes = Array(field.utf8)[...]
        while let b = bytes.popFirst() {
            if b == UInt8(ascii: "\\"), bytes.count >= 3,
               let value = UInt8(String(decoding: bytes.prefix(3), as: UTF8.self), radix: 8) {
                out.append(value)
                bytes = bytes.dropFirst(3)
            } else {
                out.append(b)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
