#!/usr/bin/env python3
"""Every write that returned while the job says actively-synced is in the target.

usage: synced_writes.py IMAGE TARGET_FILE MOUNTPOINT COUNT SEED
Writes COUNT random 4 KiB blocks (O_DIRECT) through the mount, one at a time; after each
write returns, reads .status/job.json and, if actively-synced is true, reads the block back
from TARGET_FILE (the file behind the target) and compares. Prints
`checked K of N writes while actively synced, M missing`; exits 1 if any block is missing.
"""
import json, mmap, os, random, sys

image, target, mnt, count, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
size = os.stat(image).st_size
block = 4096
buffer = mmap.mmap(-1, block)
fd = os.open(image, os.O_RDWR | os.O_DIRECT)
checked = missing = 0
for n in range(count):
    offset = rng.randrange(size // block) * block
    data = rng.randbytes(block)
    buffer.seek(0)
    buffer.write(data)
    os.pwritev(fd, [buffer], offset)
    with open(os.path.join(mnt, ".status", "job.json")) as f:
        job = json.loads(f.read())
    if job and job.get("actively-synced"):
        checked += 1
        with open(target, "rb") as t:
            t.seek(offset)
            if t.read(block) != data:
                missing += 1
                print(f"write {n} at {offset} returned while actively synced but is not in the target", flush=True)
os.close(fd)
print(f"checked {checked} of {count} writes while actively synced, {missing} missing")
sys.exit(1 if missing else 0)
