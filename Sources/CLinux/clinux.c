#define _GNU_SOURCE
#include <fcntl.h>
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
