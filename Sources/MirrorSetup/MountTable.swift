import Foundation
import MirrorCore
import CLinux
import Glibc

/// /proc/self/mountinfo, read to find mirrorfs mounts: by mountpoint, and by the device
/// number that files on them carry (st_dev).
public enum MountTable {
    /// Whether `errno`, from a request to a FUSE mount, says its daemon is gone: ENOTCONN
    /// once the connection has ended, ECONNABORTED for a request that was under way when
    /// it ended (the last holder of /dev/fuse died meanwhile).
    public static func daemonGone(_ errno: Int32) -> Bool {
        errno == ENOTCONN || errno == ECONNABORTED
    }

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

extension MountTable {
    /// What reading a root attribute of a mount found.
    public enum AttributeRead: Sendable {
        case value(String)
        case failed(errno: Int32)
        /// No answer within the deadline: the mount's daemon may be stopped.
        case timedOut
    }

    /// A root attribute of a mirrorfs mount (`user.mirrorfs.*`), read on a thread of its own
    /// with a deadline: a mount whose daemon is stopped would hold the read forever.
    public static func readRootAttribute(_ name: String, of mountpoint: String, timeout: Double) -> AttributeRead {
        final class Box: @unchecked Sendable {
            var result = AttributeRead.timedOut
            let done = DispatchSemaphore(value: 0)
        }
        let box = Box()
        let thread = Thread {
            var buffer = [UInt8](repeating: 0, count: 4096)
            let length = Int(clinux_getxattr(mountpoint, name, &buffer, UInt(buffer.count)))
            box.result = length > 0 ? .value(String(decoding: buffer[0..<length], as: UTF8.self)) : .failed(errno: errno)
            box.done.signal()
        }
        thread.start()
        guard box.done.wait(timeout: .now() + timeout) == .success else { return .timedOut }
        return box.result
    }

    public static func rootAttribute(_ name: String, of mountpoint: String, timeout: Double) -> String? {
        if case .value(let value) = readRootAttribute(name, of: mountpoint, timeout: timeout) { return value }
        return nil
    }

    /// Who holds the image at `path`, as a person acts on it: the mirrorfs mount that serves
    /// it or whose job writes it, and the command that ends that; else a hint at the usual
    /// other holders.
    public static func holder(of path: String) -> String {
        func resolved(_ path: String) -> String {
            realpath(path, nil).map { p in defer { free(p) }; return String(cString: p) } ?? path
        }
        let image = resolved(path)
        for mount in mirrorfsMounts() {
            // What it serves now (the target after a pivot); its source only if it cannot tell.
            let serving = rootAttribute(RootAttribute.serving, of: mount.mountpoint, timeout: 2) ?? mount.source
            if resolved(serving) == image {
                return "it is served by the mirrorfs mount '\(mount.mountpoint)'; end that with 'mirrorfs unmount \(mount.mountpoint)'"
            }
            if let target = rootAttribute(RootAttribute.target, of: mount.mountpoint, timeout: 2), resolved(target) == image {
                return "it is the target of the job on the mirrorfs mount '\(mount.mountpoint)'; end that with 'mirrorfs job cancel \(mount.mountpoint)'"
            }
        }
        return "another program has it open (a VM, qemu-img, qemu-nbd or a mirrorfs of another mount namespace); stop it first"
    }
}
