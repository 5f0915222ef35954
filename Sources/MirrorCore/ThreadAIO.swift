import CLinux
import Glibc
import SystemPackage

/// The calling thread's Linux AIO context, made at its first use and destroyed when the
/// thread exits (thread-specific data, as `Companion`). A mirrored write submits its
/// target half here and writes the source meanwhile: the kernel queues an O_DIRECT write
/// to the device at submission and completes it by interrupt, so the two writes overlap
/// with no second thread to wake (SPEC 10: a write costs the slower of the two).
final class ThreadAIO {
    private let context: UInt

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        guard pthread_key_create(&key, { pointer in
            guard let pointer, UInt(bitPattern: pointer) != ThreadAIO.unavailable else { return }
            Unmanaged<ThreadAIO>.fromOpaque(pointer).release()
        }) == 0 else {
            fatalError("no thread-specific data key left for the AIO contexts")
        }
        return key
    }()

    /// Set on a thread whose io_setup failed (the system's aio-max-nr reached): it does
    /// not try again.
    private static let unavailable: UInt = 1

    /// The calling thread's context; nil when the kernel gives it none.
    static var current: ThreadAIO? {
        if let pointer = pthread_getspecific(key) {
            return UInt(bitPattern: pointer) == unavailable ? nil : Unmanaged<ThreadAIO>.fromOpaque(pointer).takeUnretainedValue()
        }
        var context: UInt = 0
        guard clinux_aio_setup(4, &context) == 0 else {
            pthread_setspecific(key, UnsafeRawPointer(bitPattern: unavailable))
            return nil
        }
        let aio = ThreadAIO(context: context)
        pthread_setspecific(key, Unmanaged.passRetained(aio).toOpaque())
        return aio
    }

    private init(context: UInt) { self.context = context }

    deinit { clinux_aio_destroy(context) }

    /// Submits a pwrite of `buffer` (aligned as `fd` needs) at `offset`, runs `meanwhile`,
    /// then waits for the write: `meanwhile`'s result and the bytes written (or the errno).
    /// Nil, with `meanwhile` not run, when the kernel refused the submission.
    func write<T>(_ fd: CInt, _ buffer: UnsafeRawBufferPointer, at offset: UInt64,
                  meanwhile: () -> T) -> (T, Result<Int, Errno>)? {
        guard clinux_aio_submit_pwrite(context, fd, buffer.baseAddress, UInt(buffer.count), Int64(offset), 1) == 0 else {
            return nil
        }
        let result = meanwhile()
        var tag: UInt64 = 0
        var written: Int64 = 0
        // One request in flight on this context: the completion is ours. A failed wait
        // (never expected: EFAULT, EINVAL) cannot leave the request behind, as the buffer is
        // the caller's: destroying the context waits for it.
        let n = clinux_aio_wait(context, 1, -1, &tag, &written)
        guard n == 1 else {
            preconditionFailure("io_getevents failed with \(Errno(rawValue: -n)) while a write was in flight")
        }
        return (result, written < 0 ? .failure(Errno(rawValue: CInt(-written))) : .success(Int(written)))
    }
}
