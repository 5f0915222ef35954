import CLinux
import Glibc

/// QEMU's image locking (block/file-posix.c), so that QEMU's tools and mirrorfs see each
/// other: OFD read locks on single bytes of the image file. Byte 100+i is held for each
/// permission bit i a user takes, byte 200+i for each permission it does not share with
/// others. Holding is shared (read locks); a conflict is found by testing the opposite
/// byte for a lock of another open file description. As QEMU does, the bytes are locked
/// first and checked after, so two openers racing cannot both pass.
///
/// The locks live as long as the descriptor (closing it, or the process dying, drops them).
public enum ImageLock {
    /// BlockPermission bits in QEMU's order; their index is the lock byte's offset.
    enum Permission: Int, CaseIterable {
        case consistentRead = 0, write, writeUnchanged, resize

        /// The name QEMU's messages use.
        var name: String {
            switch self {
            case .consistentRead: "consistent read"
            case .write: "write"
            case .writeUnchanged: "write unchanged"
            case .resize: "resize"
            }
        }
    }
    static let permissionBase: off_t = 100
    static let sharedBase: off_t = 200

    /// Takes the locks of a user that serves the image as a VM's disk does (QEMU's
    /// share-rw=off): reading, writing unless `writable` is false, and sharing neither
    /// write nor resize with anyone. Throws when another process holds the image in a
    /// conflicting way, with QEMU's wording.
    public static func acquire(fd: CInt, path: String, writable: Bool) throws(ImageLockError) {
        let taken: [Permission] = writable ? [.consistentRead, .write] : [.consistentRead]
        let unshared: [Permission] = [.write, .resize]
        // A file system without OFD locks (some network file systems) cannot take part, as
        // with QEMU's locking=auto.
        for byte in taken.map({ permissionBase + off_t($0.rawValue) }) + unshared.map({ sharedBase + off_t($0.rawValue) }) {
            guard clinux_ofd_read_lock(fd, byte) != 0 else { continue }
            let reason = errno
            if reason == EINVAL || reason == ENOLCK || reason == EOPNOTSUPP || reason == ENOSYS { return }
            // Another process holds a conflicting (write) lock over the byte.
            throw ImageLockError(path: path, reason: "Failed to lock byte \(byte)")
        }
        // Another user that does not share what we take, or takes what we do not share.
        for permission in taken where clinux_ofd_byte_locked_by_others(fd, sharedBase + off_t(permission.rawValue)) != 0 {
            throw ImageLockError(path: path, reason: "Failed to get \"\(permission.name)\" lock")
        }
        for permission in unshared where clinux_ofd_byte_locked_by_others(fd, permissionBase + off_t(permission.rawValue)) != 0 {
            throw ImageLockError(path: path, reason: "Failed to get shared \"\(permission.name)\" lock")
        }
    }

    /// Drops every lock byte `acquire` may have taken on `fd`.
    public static func release(fd: CInt) {
        for permission in Permission.allCases {
            _ = clinux_ofd_unlock(fd, permissionBase + off_t(permission.rawValue))
            _ = clinux_ofd_unlock(fd, sharedBase + off_t(permission.rawValue))
        }
    }
}

/// Another process holds the image (QEMU, qemu-img, another mirrorfs), or it cannot be locked.
public struct ImageLockError: Error, CustomStringConvertible, Sendable {
    public let path: String
    public let reason: String
    public var description: String { "image '\(path)' is in use by another process (\(reason))" }
}
