// The ceiling for tools/bench/fuse-io: the smallest multi-threaded libfuse low-level
// passthrough that serves one image file with mirrorfs's kernel settings, and nothing
// else — no mirror filter, no locks, no job. What it reaches is what a FUSE round trip
// costs on this machine; mirrorfs/ceiling shows what the product adds on top.
//
//   fuse-ceiling IMAGE MOUNTPOINT [passthrough|cached|null]   (foreground; fusermount3 -u ends it)
//
// Same settings as mirrorfs: direct_io and parallel direct writes in the open reply,
// max_write 1 MiB, no writeback cache, 16 workers with one /dev/fuse clone each,
// O_DIRECT clients served through an O_DIRECT descriptor of the image (passthrough, the
// default) or every client through the page cache (cached), as `mount --odirect`. null
// answers reads without touching the image: the cost of the FUSE round trip alone.
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse3/fuse_lowlevel.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { ROOT = 1, IMAGE = 2, MAX_IO = 1 << 20, ALIGN = 4096 };
enum { FOPEN_DIRECT_IO = 1 << 0, FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6 };

static int cached_fd, direct_fd;
static int null_reads;
static off_t image_size;
static const char *image_name;

// Per worker: O_DIRECT needs aligned memory, and libfuse's write payload is not.
static __thread void *bounce;

static void *bounce_buffer(void) {
    if (!bounce && posix_memalign(&bounce, ALIGN, MAX_IO) != 0) bounce = NULL;
    return bounce;
}

static void fill_attr(fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    if (ino == ROOT) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0644;
        st->st_nlink = 1;
        st->st_size = image_size;
    }
}

static void ceiling_init(void *userdata, struct fuse_conn_info *conn) {
    (void)userdata;
    conn->max_write = MAX_IO;
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
    conn->max_background = 64;
    conn->congestion_threshold = 48;
}

static void ceiling_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    if (parent != ROOT || strcmp(name, image_name) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct fuse_entry_param entry = { .ino = IMAGE, .generation = 1, .entry_timeout = 1 };
    fill_attr(IMAGE, &entry.attr);
    fuse_reply_entry(req, &entry);
}

static void ceiling_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    fill_attr(ino, &st);
    fuse_reply_attr(req, &st, 0);
}

// libfuse 3.14's fuse_file_info has no bit for FOPEN_PARALLEL_DIRECT_WRITES: reply by hand.
static void ceiling_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    if (ino != IMAGE) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    struct { uint64_t fh; uint32_t open_flags; int32_t backing_id; } out = {
        .fh = (fi->flags & O_DIRECT) ? (uint64_t)direct_fd : (uint64_t)cached_fd,
        .open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
    };
    struct iovec iov = { .iov_base = &out, .iov_len = sizeof out };
    fuse_reply_iov(req, &iov, 1);
}

static void ceiling_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info *fi) {
    (void)ino;
    void *buffer = bounce_buffer();
    if (!buffer) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    size_t count = size < MAX_IO ? size : MAX_IO;
    ssize_t got = null_reads ? (ssize_t)count : pread((int)fi->fh, buffer, count, offset);
    if (got < 0) fuse_reply_err(req, errno);
    else fuse_reply_buf(req, buffer, (size_t)got);
}

static void ceiling_write(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t offset,
                          struct fuse_file_info *fi) {
    (void)ino;
    const void *source = data;
    if ((int)fi->fh == direct_fd && direct_fd != cached_fd && ((uintptr_t)data % ALIGN) != 0) {
        void *buffer = bounce_buffer();
        if (!buffer) {
            fuse_reply_err(req, ENOMEM);
            return;
        }
        memcpy(buffer, data, size);
        source = buffer;
    }
    ssize_t put = pwrite((int)fi->fh, source, size, offset);
    if (put < 0) fuse_reply_err(req, errno);
    else fuse_reply_write(req, (size_t)put);
}

static void ceiling_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
    (void)ino;
    fuse_reply_err(req, (datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh)) < 0 ? errno : 0);
}

static void ceiling_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info *fi) {
    (void)ino; (void)size; (void)offset; (void)fi;
    fuse_reply_buf(req, NULL, 0);
}

static const struct fuse_lowlevel_ops operations = {
    .init = ceiling_init,
    .lookup = ceiling_lookup,
    .getattr = ceiling_getattr,
    .open = ceiling_open,
    .read = ceiling_read,
    .write = ceiling_write,
    .fsync = ceiling_fsync,
    .readdir = ceiling_readdir,
};

int main(int argc, char **argv) {
    int cached = argc == 4 && strcmp(argv[3], "cached") == 0;
    null_reads = argc == 4 && strcmp(argv[3], "null") == 0;
    if (argc < 3 || argc > 4 || (argc == 4 && !cached && !null_reads && strcmp(argv[3], "passthrough") != 0)) {
        fprintf(stderr, "usage: %s IMAGE MOUNTPOINT [passthrough|cached|null]\n", argv[0]);
        return 2;
    }
    struct stat st;
    cached_fd = open(argv[1], O_RDWR);
    direct_fd = cached ? cached_fd : open(argv[1], O_RDWR | O_DIRECT);
    if (cached_fd < 0 || direct_fd < 0 || fstat(cached_fd, &st) < 0) {
        perror(argv[1]);
        return 1;
    }
    image_size = st.st_size;
    image_name = strrchr(argv[1], '/') ? strrchr(argv[1], '/') + 1 : argv[1];

    char *words[] = { argv[0], "-o", "default_permissions,fsname=fuse-ceiling", NULL };
    struct fuse_args args = FUSE_ARGS_INIT(3, words);
    struct fuse_session *session = fuse_session_new(&args, &operations, sizeof operations, NULL);
    if (!session || fuse_set_signal_handlers(session) != 0 || fuse_session_mount(session, argv[2]) != 0) return 1;
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(config, 16);
    fuse_loop_cfg_set_clone_fd(config, 1);
    int status = fuse_session_loop_mt(session, config);
    fuse_loop_cfg_destroy(config);
    fuse_session_unmount(session);
    fuse_remove_signal_handlers(session);
    fuse_session_destroy(session);
    return status < 0 ? 1 : 0;
}
