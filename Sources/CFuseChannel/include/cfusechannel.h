#ifndef MIRRORFS_CFUSECHANNEL_H
#define MIRRORFS_CFUSECHANNEL_H

// The server's side of /dev/fuse, as libfuse's custom io (fuse_session_custom_io): plain
// read/writev on the descriptor, plus what a server needs to take over a live connection
// from one that died: the kernel's FUSE_INIT is recorded as it is read; a taking-over
// server replays it as its first read (so libfuse negotiates exactly what the kernel
// agreed), its reply to the replay never reaches the kernel, the other readers wait until
// the session is initialised, and FUSE_NOTIFY_RESEND has the kernel requeue what the dead
// server had read but not answered. libc only: no libfuse types (the kernel's wire layout).
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/// Before the loop. `replay` (copied) is a recorded FUSE_INIT request: the first read
/// returns it and the reply to it is dropped; NULL for a fresh mount, whose kernel INIT is
/// recorded instead. Every other read waits until `cfc_release_readers`.
void cfc_configure(const void *replay, size_t replay_len);
/// libfuse's custom io read and writev.
ssize_t cfc_read(int fd, void *buf, size_t buf_len, void *userdata);
ssize_t cfc_writev(int fd, struct iovec *iov, int count, void *userdata);
/// From the init callback (libfuse has marked the session initialised): readers go on.
void cfc_release_readers(void);
/// The FUSE_INIT request read from the kernel (or replayed), and the reply libfuse made
/// for it (sent after the init callback: waits up to `wait_ms` for it): bytes copied into
/// `out` (at most `cap`), 0 while there is none.
size_t cfc_recorded_init(void *out, size_t cap);
size_t cfc_recorded_init_reply(void *out, size_t cap, int wait_ms);
/// Whether an INIT request says the kernel can resend (protocol >= 7.40, FUSE_HAS_RESEND).
int cfc_init_offers_resend(const void *init, size_t len);
/// FUSE_NOTIFY_RESEND on `fd`: 0, or -1 with errno.
int cfc_notify_resend(int fd);

#endif
