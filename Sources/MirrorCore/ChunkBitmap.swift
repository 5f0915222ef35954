/// One bit per chunk of `granularity` bytes. As the dirty bitmap: set while the chunk's data may differ
/// between source and target. As the in-flight bitmap: set while an operation owns the
/// chunk. Not thread-safe: the job's lock guards it.
struct ChunkBitmap {
    let granularity: UInt64
    let size: UInt64
    let chunkCount: Int
    private var words: [UInt64]
    /// Number of set bits, kept current so the dirty byte count is O(1).
    private(set) var dirtyChunks = 0

    init(size: UInt64, granularity: UInt64) {
        precondition(granularity.nonzeroBitCount == 1, "granularity must be a power of two")
        self.granularity = granularity
        self.size = size
        chunkCount = Int((size + granularity - 1) / granularity)
        words = [UInt64](repeating: 0, count: (chunkCount + 63) / 64)
    }

    /// Chunks touched by the byte range [offset, offset+length).
    func chunks(covering offset: UInt64, length: UInt64) -> Range<Int> {
        guard length > 0 else { return 0..<0 }
        let first = Int(offset / granularity)
        let last = Int((offset + length - 1) / granularity)
        return first..<min(last + 1, chunkCount)
    }

    /// Chunks lying completely inside the byte range (start rounded up, end rounded down).
    func chunks(inside offset: UInt64, length: UInt64) -> Range<Int> {
        let first = Int((offset + granularity - 1) / granularity)
        let end = offset + length
        // The image's last chunk may be short: reaching the image end covers it.
        let last = end >= size ? chunkCount : Int(end / granularity)
        return first < last ? first..<last : 0..<0
    }

    func isDirty(_ chunk: Int) -> Bool {
        words[chunk >> 6] & (1 << UInt64(chunk & 63)) != 0
    }

    mutating func set(_ chunks: Range<Int>) {
        for chunk in chunks where !isDirty(chunk) {
            words[chunk >> 6] |= 1 << UInt64(chunk & 63)
            dirtyChunks += 1
        }
    }

    mutating func clear(_ chunks: Range<Int>) {
        for chunk in chunks where isDirty(chunk) {
            words[chunk >> 6] &= ~(1 << UInt64(chunk & 63))
            dirtyChunks -= 1
        }
    }

    mutating func setAll() { set(0..<chunkCount) }

    /// The first dirty chunk at or after `start`, wrapping to 0 once; nil when clean.
    func nextDirty(from start: Int) -> Int? {
        guard dirtyChunks > 0 else { return nil }
        if let found = scan(from: start, to: chunkCount) { return found }
        return scan(from: 0, to: min(start, chunkCount))
    }

    private func scan(from start: Int, to end: Int) -> Int? {
        var chunk = start
        while chunk < end {
            let word = words[chunk >> 6] >> UInt64(chunk & 63)
            if word == 0 {
                chunk = (chunk | 63) + 1
                continue
            }
            let found = chunk + word.trailingZeroBitCount
            return found < end ? found : nil
        }
        return nil
    }

    /// Byte length of the dirty chunks (the image's last chunk may be short).
    var dirtyBytes: UInt64 {
        guard dirtyChunks > 0 else { return 0 }
        let bytes = UInt64(dirtyChunks) * granularity
        let lastShortfall = UInt64(chunkCount) * granularity - size
        return isDirty(chunkCount - 1) ? bytes - lastShortfall : bytes
    }
}
