#define _GNU_SOURCE
#include <fcntl.h>
#include <string.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
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

static void clinux_route_exit_signal(int sig, siginfo_t *info, void *context) {
    if (!pthread_equal(pthread_self(), clinux_loop_thread)) {
        pthread_kill(clinux_loop_thread, sig);
        return;
    }
    for (int i = 0; i < 3; i++) {
        if (clinux_exit_signals[i] != sig) continue;
        struct sigaction *previous = &clinux_previous[i];
        if (previous->sa_flags & SA_SIGINFO) {
            if (previous->sa_sigaction) previous->sa_sigaction(sig, info, context);
        } else if (previous->sa_handler != SIG_IGN && previous->sa_handler != SIG_DFL) {
            previous->sa_handler(sig);
        } else if (previous->sa_handler == SIG_DFL) {
            signal(sig, SIG_DFL);
            raise(sig);
        }
    }
}

int clinux_route_exit_signals_to_this_thread(void) {
    clinux_loop_thread = pthread_self();
    for (int i = 0; i < 3; i++) {
        if (sigaction(clinux_exit_signals[i], NULL, &clinux_previous[i]) != 0) return -1;
        struct sigaction routed;
        memset(&routed, 0, sizeof routed);
        sigemptyset(&routed.sa_mask);
        routed.sa_sigaction = clinux_route_exit_signal;
        // No SA_RESTART: the loop thread's wait must return EINTR and see the exit flag.
        routed.sa_flags = SA_SIGINFO;
        if (sigaction(clinux_exit_signals[i], &routed, NULL) != 0) return -1;
    }
    return 0;
}

int clinux_tgkill(pid_t pid, pid_t tid, int signal) {
    return (int)syscall(SYS_tgkill, pid, tid, signal);
}
