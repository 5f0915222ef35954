import Dispatch
import Foundation
import Glibc

/// A second thread for the calling thread: a mirrored write hands its target half to it and
/// writes the source meanwhile, so the write costs the slower of the two, not their sum
/// (SPEC 10); an fsync flushes both the same way. Each calling thread (a FUSE worker) has
/// its own companion (thread-specific data), made at its first use and ended with it, so
/// handing over takes no lock: one semaphore each way.
final class Companion: @unchecked Sendable {
    private let start = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    /// Set by the owning thread before `start` is signalled, run and cleared by the
    /// companion before it signals `finished` (the semaphores order the accesses).
    private var work: (() -> Void)?
    private var ending = false

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        guard pthread_key_create(&key, { pointer in
            guard let pointer else { return }
            Unmanaged<Companion>.fromOpaque(pointer).takeRetainedValue().end()
        }) == 0 else {
            fatalError("no thread-specific data key left for the write companions")
        }
        return key
    }()

    /// The calling thread's companion.
    static var current: Companion {
        if let pointer = pthread_getspecific(key) {
            return Unmanaged<Companion>.fromOpaque(pointer).takeUnretainedValue()
        }
        let companion = Companion()
        pthread_setspecific(key, Unmanaged.passRetained(companion).toOpaque())
        return companion
    }

    private init() {
        let thread = Thread { [self] in
            while true {
                start.wait()
                if ending { return }
                work?()
                work = nil
                finished.signal()
            }
        }
        thread.name = "mirror-companion"
        thread.start()
    }

    /// The owning thread exited.
    private func end() {
        ending = true
        start.signal()
    }

    /// Runs `there` on the companion while `here` runs on this thread; returns `here`'s
    /// result once both are done.
    func run<T>(_ here: () -> T, alongside there: () -> Void) -> T {
        withoutActuallyEscaping(there) { escapable in
            work = escapable
            start.signal()
            let result = here()
            finished.wait()
            return result
        }
    }
}
