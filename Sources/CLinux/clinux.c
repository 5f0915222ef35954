#define _GNU_SOURCE
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <errno.h>
#include <linux/aio_abi.h>
#include <linux/falloc.h>
#include <spawn.h>
#include <sys/xattr.h>
#include <unistd.h>
#include "clinux.h"

const int CLINUX_O_DIRECT = O_DIRECT;
const int CLINUX_SEEK_DATA = SEEK_DATA;
const int CLINUX_SEEK_HOLE = SEEK_HOLE;
const int CLINUX_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int CLINUX_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int CLINUX_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
const int CLINUX_POSIX_SPAWN_SETSID = POSIX_SPAWN_SETSID;

int clinux_pipe2_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}
int clinux_spawn_addclosefrom(void *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)actions, from);
}
long clinux_getxattr(const char *path, const char *name, void *value, unsigned long size) {
    return getxattr(path, name, value, size);
}

int clinux_fallocate(int fd, int mode, off_t offset, off_t length) {
    return fallocate(fd, mode, offset, length);
}

int clinux_ofd_read_lock(int fd, off_t start) {
    struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = 1 };
    return fcntl(fd, F_OFD_SETLK, &fl);
}

int clinux_ofd_byte_locked_by_others(int fd, off_t start) {
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = 1 };
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return -1;
    return fl.l_type != F_UNLCK;
}

int clinux_ofd_unlock(int fd, off_t start) {
    struct flock fl = { .l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = 1 };
    return fcntl(fd, F_OFD_SETLK, &fl);
}

static pthread_t clinux_loop_thread;
static struct sigaction clinux_previous[3];
static const int clinux_exit_signals[3] = { SIGINT, SIGTERM, SIGHUP };
static volatile sig_atomic_t clinux_exit_signal_seen = 0;
static volatile sig_atomic_t clinux_hand_over_seen = 0;

static void clinux_run_previous(int index, int sig, siginfo_t *info, void *context) {
    struct sigaction *previous = &clinux_previous[index];
    if (previous->sa_flags & SA_SIGINFO) {
        if (previous->sa_sigaction) previous->sa_sigaction(sig, info, context);
    } else if (previous->sa_handler != SIG_IGN && previous->sa_handler != SIG_DFL) {
        previous->sa_handler(sig);
    } else if (previous->sa_handler == SIG_DFL) {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

static void clinux_route_exit_signal(int sig, siginfo_t *info, void *context) {
    if (!pthread_equal(pthread_self(), clinux_loop_thread)) {
        pthread_kill(clinux_loop_thread, sig);
        return;
    }
    if (sig == SIGUSR1) {
        // A hand-over ends the loop as SIGTERM does (libfuse's handler flags the exit).
        clinux_hand_over_seen = 1;
        clinux_run_previous(1, SIGTERM, info, context);
        return;
    }
    clinux_exit_signal_seen = 1;
    for (int i = 0; i < 3; i++) {
        if (clinux_exit_signals[i] == sig) clinux_run_previous(i, sig, info, context);
    }
}

int clinux_route_exit_signals_to_this_thread(void) {
    clinux_loop_thread = pthread_self();
    struct sigaction routed;
    memset(&routed, 0, sizeof routed);
    sigemptyset(&routed.sa_mask);
    routed.sa_sigaction = clinux_route_exit_signal;
    // No SA_RESTART: the loop thread's wait must return EINTR and see the exit flag.
    routed.sa_flags = SA_SIGINFO;
    for (int i = 0; i < 3; i++) {
        if (sigaction(clinux_exit_signals[i], NULL, &clinux_previous[i]) != 0) return -1;
        if (sigaction(clinux_exit_signals[i], &routed, NULL) != 0) return -1;
    }
    return sigaction(SIGUSR1, &routed, NULL);
}

int clinux_exit_signal_received(void) { return clinux_exit_signal_seen; }
int clinux_hand_over_requested(void) { return clinux_hand_over_seen; }

int clinux_send_text_and_fd(int socket, const char *text, int fd) {
    struct iovec iov = { .iov_base = (void *)text, .iov_len = strlen(text) };
    char control[CMSG_SPACE(sizeof(int))];
    memset(control, 0, sizeof control);
    struct msghdr message = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (fd >= 0) {
        message.msg_control = control;
        message.msg_controllen = sizeof control;
        struct cmsghdr *c = CMSG_FIRSTHDR(&message);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    return sendmsg(socket, &message, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

int clinux_tgkill(pid_t pid, pid_t tid, int signal) {
    return (int)syscall(SYS_tgkill, pid, tid, signal);
}

int clinux_aio_setup(unsigned depth, unsigned long *context) {
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, depth, &ctx) != 0) return -errno;
    *context = (unsigned long)ctx;
    return 0;
}

void clinux_aio_destroy(unsigned long context) {
    syscall(SYS_io_destroy, (aio_context_t)context);
}

int clinux_aio_submit_pwrite(unsigned long context, int fd, const void *buffer, unsigned long count,
                             long long offset, unsigned long long tag) {
    // The kernel copies the control block during the call: it may live on the stack.
    struct iocb cb;
    memset(&cb, 0, sizeof cb);
    cb.aio_data = tag;
    cb.aio_lio_opcode = IOCB_CMD_PWRITE;
    cb.aio_fildes = (unsigned)fd;
    cb.aio_buf = (unsigned long long)(unsigned long)buffer;
    cb.aio_nbytes = count;
    cb.aio_offset = offset;
    struct iocb *list[1] = { &cb };
    long n;
    do { n = syscall(SYS_io_submit, (aio_context_t)context, 1L, list); } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    return n == 1 ? 0 : -EAGAIN;
}

int clinux_aio_wait(unsigned long context, int max, int timeout_ms, unsigned long long *tags, long long *results) {
    struct io_event events[16];
    if (max > 16) max = 16;
    struct timespec timeout = { .tv_sec = timeout_ms / 1000, .tv_nsec = (long)(timeout_ms % 1000) * 1000000L };
    long n;
    do {
        n = syscall(SYS_io_getevents, (aio_context_t)context, 1L, (long)max, events, timeout_ms < 0 ? NULL : &timeout);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    for (long i = 0; i < n; i++) {
        tags[i] = events[i].data;
        results[i] = events[i].res;
    }
    return (int)n;
}
