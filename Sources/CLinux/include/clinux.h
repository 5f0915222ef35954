#ifndef MIRRORFS_CLINUX_H
#define MIRRORFS_CLINUX_H

// Linux-only file APIs that Swift's Glibc module hides behind _GNU_SOURCE. The header
// stays free of _GNU_SOURCE (it would clash with the Glibc module); clinux.c defines it.
#include <sys/types.h>

extern const int CLINUX_O_DIRECT;
extern const int CLINUX_SEEK_DATA;
extern const int CLINUX_SEEK_HOLE;
extern const int CLINUX_FALLOC_FL_KEEP_SIZE;
extern const int CLINUX_FALLOC_FL_PUNCH_HOLE;
extern const int CLINUX_FALLOC_FL_ZERO_RANGE;

extern const int CLINUX_POSIX_SPAWN_SETSID;

int clinux_pipe2_cloexec(int fds[2]);
/// posix_spawn_file_actions_addclosefrom_np: the child closes every descriptor from `from` up.
int clinux_spawn_addclosefrom(void *actions, int from);
long clinux_getxattr(const char *path, const char *name, void *value, unsigned long size);
int clinux_fallocate(int fd, int mode, off_t offset, off_t length);
/// An OFD read lock on the one byte at `start` (F_OFD_SETLK, F_RDLCK); -1 with errno on failure.
int clinux_ofd_read_lock(int fd, off_t start);
/// Drops this open file description's lock on the byte at `start` (F_OFD_SETLK, F_UNLCK).
int clinux_ofd_unlock(int fd, off_t start);
/// Whether a process other than this open file description holds a lock on the byte at
/// `start` (F_OFD_GETLK for a write lock): 1 yes, 0 no, -1 with errno on failure.
int clinux_ofd_byte_locked_by_others(int fd, off_t start);

/// The handlers now installed for SIGINT, SIGTERM and SIGHUP (and SIGUSR1, see below) (libfuse's, which only flag
/// the session as exited) run on the calling thread, the one that waits in the FUSE loop:
/// a signal the kernel gives to any other thread (a job's, the log writer's) is sent on
/// to it, so the loop always wakes. 0, or -1 with errno.
int clinux_route_exit_signals_to_this_thread(void);
/// Whether SIGINT, SIGTERM or SIGHUP ended the loop (1), and whether SIGUSR1 asked for a
/// hand-over to a new server (1): SIGUSR1 is routed as the others are and ends the loop.
int clinux_exit_signal_received(void);
int clinux_hand_over_requested(void);
/// One datagram `text` on a unix socket, with descriptor `fd` attached (SCM_RIGHTS) unless
/// it is -1. 0, or -1 with errno.
int clinux_send_text_and_fd(int socket, const char *text, int fd);
/// tgkill(2): `signal` to one thread `tid` of process `pid` (tests).
int clinux_tgkill(pid_t pid, pid_t tid, int signal);

/// Linux native AIO (io_setup(2) and friends), for a write that runs in the kernel while
/// the calling thread does another: an O_DIRECT pwrite on ext4 or xfs is queued to the
/// device at submission and completes by interrupt, with no second thread.
/// A context for up to `depth` requests: 0 and `*context` set, or -errno.
int clinux_aio_setup(unsigned depth, unsigned long *context);
void clinux_aio_destroy(unsigned long context);
/// Submits one pwrite of `count` bytes of `buffer` at `offset` of `fd`; `tag` comes back
/// with its completion. 0, or -errno (nothing was submitted).
int clinux_aio_submit_pwrite(unsigned long context, int fd, const void *buffer, unsigned long count,
                             long long offset, unsigned long long tag);
/// Waits for at least one completion (up to `max`, at most 16) for up to `timeout_ms`
/// (forever when negative), retrying on EINTR: their tags and results (bytes written, or
/// -errno). The number completed (0: the time ran out), or -errno.
int clinux_aio_wait(unsigned long context, int max, int timeout_ms, unsigned long long *tags, long long *results);

#endif
