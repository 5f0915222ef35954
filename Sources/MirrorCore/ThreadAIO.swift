import CLinux
import Glibc
import SystemPackage

/// The calling thread's Linux AIO context, made at its first use and destroyed when the
/// thread exits (thread-specific data, as `Companion`). A mirrored write submits its
/// target half here and writes the source meanwhile: the kernel queues an O_DIRECT write
/// to the device at submission and completes it by interrupt, so the two writes overlap
/// with no second thread to wake (SPEC 10: a write costs the slower of the two).
final class ThreadAIO {
    private let context: AIOContext

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
        guard let context = AIOContext(depth: 4) else {
            pthread_setspecific(key, UnsafeRawPointer(bitPattern: unavailable))
            return nil
        }
        let aio = ThreadAIO(context: context)
        pthread_setspecific(key, Unmanaged.passRetained(aio).toOpaque())
        return aio
    }

    private init(context: AIOContext) { self.context = context }

    /// Submits a pwrite of `buffer` (aligned as `fd` needs) at `offset`, runs `meanwhile`,
    /// then waits for the write: `meanwhile`'s result and the bytes written (or the errno).
    /// Nil, with `meanwhile` not run, when the kernel refused the submission.
    func write<T>(_ fd: CInt, _ buffer: UnsafeRawBufferPointer, at offset: UInt64,
                  meanwhile: () -> T) -> (T, Result<Int, Errno>)? {
        guard context.submitWrite(fd, buffer, at: offset, tag: 1) else { return nil }
        let result = meanwhile()
        // One request in flight on this context: the completion is ours.
        guard let completion = context.wait(max: 1, timeout: -1)?.first else {
            preconditionFailure("io_getevents failed while a write was in flight")
        }
        return (result, completion.written)
    }
}

/// A Linux AIO context (io_setup(2)), destroyed with the value; thin typed calls over
/// CLinux's: `ThreadAIO` and `WriteThroughQueue` use it.
final class AIOContext: Sendable {
    private let context: UInt

    /// Nil when the kernel gives none (the system's aio-max-nr reached).
    init?(depth: Int) {
        var context: UInt = 0
        guard clinux_aio_setup(UInt32(depth), &context) == 0 else { return nil }
        self.context = context
    }

    /// Waits for the requests in flight.
    deinit { clinux_aio_destroy(context) }

    /// Submits a pwrite of `buffer` (aligned as `fd` needs) at `offset`; false when the
    /// kernel refused it (nothing in flight).
    func submitWrite(_ fd: CInt, _ buffer: UnsafeRawBufferPointer, at offset: UInt64, tag: UInt64) -> Bool {
        clinux_aio_submit_pwrite(context, fd, buffer.baseAddress, UInt(buffer.count), Int64(offset), tag) == 0
    }

    /// Waits up to `timeout` ms (forever when negative) for 1 to `max` (≤ 16) completions:
    /// each one's tag and bytes written or errno. Nil when the time ran out or the wait
    /// failed.
    func wait(max: Int, timeout: Int32) -> [(tag: UInt64, written: Result<Int, Errno>)]? {
        var tags = [UInt64](repeating: 0, count: 16)
        var results = [Int64](repeating: 0, count: 16)
        let n = clinux_aio_wait(context, Int32(min(max, 16)), timeout, &tags, &results)
        guard n > 0 else { return nil }
        return (0..<Int(n)).map { i in
            (tags[i], results[i] < 0 ? .failure(Errno(rawValue: CInt(-results[i]))) : .success(Int(results[i])))
        }
    }
}
