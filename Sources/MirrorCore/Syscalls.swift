import CLinux
import Glibc
import SystemPackage

// The one seam between MirrorCore and libc for file I/O. Each wrapper turns -1 into
// the `Errno` the kernel gave and retries EINTR where retrying is safe.

@inline(__always)
func valueOrErrno<T: FixedWidthInteger>(retryOnInterrupt: Bool = true, _ call: () -> T) -> Result<T, Errno> {
    while true {
        let value = call()
        if value != -1 { return .success(value) }
        let error = Errno(rawValue: errno)
        if retryOnInterrupt && error == .interrupted { continue }
        return .failure(error)
    }
}

/// pread(2) until `buffer` is full or end of file; returns the bytes read.
func system_preadFully(_ fd: CInt, _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Result<Int, Errno> {
    var done = 0
    while done < buffer.count {
        let result = valueOrErrno {
            pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
        }
        switch result {
        case .failure(let e): return .failure(e)
        case .success(0): return .success(done)
        case .success(let n): done += n
        }
    }
    return .success(done)
}

/// pwrite(2) until all of `buffer` is written.
func system_pwriteFully(_ fd: CInt, _ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Result<Void, Errno> {
    var done = 0
    while done < buffer.count {
        let result = valueOrErrno {
            pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
        }
        switch result {
        case .failure(let e): return .failure(e)
        case .success(0): return .failure(.noSpace)
        case .success(let n): done += n
        }
    }
    return .success(())
}

/// fsync(2) or fdatasync(2).
func system_sync(_ fd: CInt, dataOnly: Bool) -> Result<Void, Errno> {
    valueOrErrno { dataOnly ? fdatasync(fd) : fsync(fd) }.map { _ in () }
}

/// fallocate(2).
func system_fallocate(_ fd: CInt, mode: CInt, offset: UInt64, length: UInt64) -> Result<Void, Errno> {
    valueOrErrno { clinux_fallocate(fd, mode, off_t(offset), off_t(length)) }.map { _ in () }
}

/// lseek(2) with CLINUX_SEEK_DATA or CLINUX_SEEK_HOLE; ENXIO means "none at or after offset".
func system_lseek(_ fd: CInt, _ offset: UInt64, whence: CInt) -> Result<UInt64, Errno> {
    valueOrErrno(retryOnInterrupt: false) { lseek(fd, off_t(offset), whence) }.map { UInt64($0) }
}

/// fstat(2).
func system_fstat(_ fd: CInt) -> Result<stat, Errno> {
    var st = stat()
    return valueOrErrno { fstat(fd, &st) }.map { _ in st }
}

/// fstatvfs(3).
func system_fstatvfs(_ fd: CInt) -> Result<statvfs, Errno> {
    var st = statvfs()
    return valueOrErrno { fstatvfs(fd, &st) }.map { _ in st }
}

/// open(2).
func system_open(_ path: String, _ flags: CInt, _ mode: mode_t = 0) -> Result<CInt, Errno> {
    valueOrErrno { open(path, flags, mode) }
}
