#ifndef MIRRORFS_CFUSE_SHIM_H
#define MIRRORFS_CFUSE_SHIM_H

#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>
#include <stdint.h>
#include <sys/uio.h>

// libfuse selects these by FUSE_USE_VERSION through macros, which Swift cannot call.
static inline int cfuse_session_loop_mt(struct fuse_session *se, struct fuse_loop_config *config) {
    return fuse_session_loop_mt(se, config);
}

// Kernel open flags (linux/fuse.h). libfuse 3.14's fuse_file_info cannot carry
// FOPEN_PARALLEL_DIRECT_WRITES, so open is answered with a hand-built fuse_open_out.
enum {
    CFUSE_FOPEN_DIRECT_IO = 1 << 0,
    CFUSE_FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6,
};

struct cfuse_open_out {
    uint64_t fh;
    uint32_t open_flags;
    int32_t backing_id;
};

static inline int cfuse_reply_open_flags(fuse_req_t req, uint64_t fh, uint32_t open_flags) {
    struct cfuse_open_out out = { .fh = fh, .open_flags = open_flags, .backing_id = 0 };
    struct iovec iov = { .iov_base = &out, .iov_len = sizeof(out) };
    return fuse_reply_iov(req, &iov, 1);
}

#endif
