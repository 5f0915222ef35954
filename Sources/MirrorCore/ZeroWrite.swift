import SystemPackage

/// Makes a range of `device` read as zeroes, as QEMU's bdrv_co_pwrite_zeroes does for a
/// target: a hole where the file system can punch one (`preferHole`), else ZERO_RANGE,
/// else — on file systems without fallocate (ramfs, vfat, NFSv3, tmpfs for ZERO_RANGE) —
/// written zeroes.
func writeZeroes(to device: any BlockDevice, at offset: UInt64, length: UInt64, preferHole: Bool) throws(Errno) {
    for hole in preferHole ? [true, false] : [false, true] {
        do {
            if hole {
                try device.punchHole(at: offset, length: length)
            } else {
                try device.zeroRange(at: offset, length: length)
            }
            return
        } catch where error == .notSupported || error == .noFunction {
            continue
        }
    }
    var done: UInt64 = 0
    while done < length {
        let count = Int(min(length - done, UInt64(zeroBuffer.count)))
        try device.write(UnsafeRawBufferPointer(rebasing: zeroBuffer[0..<count]), at: offset + done, cache: .cached)
        done += UInt64(count)
    }
}

/// Whether every byte of `buffer` is zero. Data that is not zero almost always shows it in
/// its first word, so a write of real data pays a compare or two; zeroes are checked eight
/// bytes at a time.
func isAllZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
    let count = buffer.count
    var index = 0
    while index + 8 <= count {
        if buffer.loadUnaligned(fromByteOffset: index, as: UInt64.self) != 0 { return false }
        index += 8
    }
    while index < count {
        if buffer[index] != 0 { return false }
        index += 1
    }
    return true
}

/// 1 MiB of zeroes, never written: the source of written zeroes.
nonisolated(unsafe) private let zeroBuffer: UnsafeMutableRawBufferPointer = {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    buffer.initializeMemory(as: UInt8.self, repeating: 0)
    return buffer
}()
