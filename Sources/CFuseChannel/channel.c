#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "cfusechannel.h"

// The kernel's wire layout (include/uapi/linux/fuse.h).
struct kernel_in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct kernel_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};
struct kernel_init_in {
    uint32_t major, minor, max_readahead, flags, flags2;
};
enum {
    KERNEL_FUSE_INIT = 26,
    KERNEL_FUSE_INIT_EXT = 1u << 30,
    // flags2 bit of FUSE_HAS_RESEND (1ULL << 39), protocol 7.40.
    KERNEL_FUSE_HAS_RESEND_HIGH = 1u << (39 - 32),
    KERNEL_FUSE_NOTIFY_RESEND = 7,
    RECORD_MAX = 512,
};

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_open = PTHREAD_COND_INITIALIZER;
static pthread_cond_t reply_made = PTHREAD_COND_INITIALIZER;
static atomic_int readers_released = 0;
// 1 while the replayed INIT has not been handed out yet.
static atomic_int replay_pending = 0;
static atomic_int init_seen = 0;
static uint64_t replay_unique;
static unsigned char init_request[RECORD_MAX];
static size_t init_request_len;
static unsigned char init_reply[RECORD_MAX];
static atomic_size_t init_reply_len = 0;
static uint64_t init_unique;

void cfc_configure(const void *replay, size_t replay_len) {
    if (replay && replay_len >= sizeof(struct kernel_in_header) && replay_len <= RECORD_MAX) {
        memcpy(init_request, replay, replay_len);
        init_request_len = replay_len;
        replay_unique = ((const struct kernel_in_header *)replay)->unique;
        init_unique = replay_unique;
        atomic_store(&replay_pending, 1);
    }
}

static void wait_for_release(void) {
    if (atomic_load(&readers_released)) return;
    pthread_mutex_lock(&gate_lock);
    while (!atomic_load(&readers_released)) pthread_cond_wait(&gate_open, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
}

void cfc_release_readers(void) {
    pthread_mutex_lock(&gate_lock);
    atomic_store(&readers_released, 1);
    pthread_cond_broadcast(&gate_open);
    pthread_mutex_unlock(&gate_lock);
}

ssize_t cfc_read(int fd, void *buf, size_t buf_len, void *userdata) {
    (void)userdata;
    int expected = 1;
    if (atomic_compare_exchange_strong(&replay_pending, &expected, 0)) {
        if (buf_len < init_request_len) { errno = EINVAL; return -1; }
        memcpy(buf, init_request, init_request_len);
        atomic_store(&init_seen, 1);
        return (ssize_t)init_request_len;
    }
    // Until the session is initialised only the INIT may be read: libfuse answers any
    // other request with EIO before it has seen one.
    if (atomic_load(&init_seen)) wait_for_release();
    ssize_t n = read(fd, buf, buf_len);
    if (n >= (ssize_t)sizeof(struct kernel_in_header) && !atomic_load(&init_seen)) {
        const struct kernel_in_header *in = buf;
        if (in->opcode == KERNEL_FUSE_INIT && (size_t)n <= RECORD_MAX) {
            memcpy(init_request, buf, (size_t)n);
            init_request_len = (size_t)n;
            init_unique = in->unique;
            atomic_store(&init_seen, 1);
        }
    }
    return n;
}

ssize_t cfc_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)userdata;
    if (count > 0 && iov[0].iov_len >= sizeof(struct kernel_out_header) && atomic_load(&init_reply_len) == 0) {
        const struct kernel_out_header *out = iov[0].iov_base;
        if (atomic_load(&init_seen) && out->unique == init_unique && out->unique != 0) {
            size_t total = 0;
            for (int i = 0; i < count; i++) {
                if (total + iov[i].iov_len <= RECORD_MAX) memcpy(init_reply + total, iov[i].iov_base, iov[i].iov_len);
                total += iov[i].iov_len;
            }
            pthread_mutex_lock(&gate_lock);
            atomic_store(&init_reply_len, total <= RECORD_MAX ? total : 1);
            pthread_cond_broadcast(&reply_made);
            pthread_mutex_unlock(&gate_lock);
            // The kernel answered its INIT long ago: this reply is for no request.
            if (replay_unique != 0) return (ssize_t)total;
        }
    }
    return writev(fd, iov, count);
}

size_t cfc_recorded_init(void *out, size_t cap) {
    if (!atomic_load(&init_seen) || init_request_len > cap) return 0;
    memcpy(out, init_request, init_request_len);
    return init_request_len;
}

size_t cfc_recorded_init_reply(void *out, size_t cap, int wait_ms) {
    if (wait_ms > 0 && atomic_load(&init_reply_len) == 0) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += wait_ms / 1000;
        deadline.tv_nsec += (long)(wait_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
        pthread_mutex_lock(&gate_lock);
        while (atomic_load(&init_reply_len) == 0)
            if (pthread_cond_timedwait(&reply_made, &gate_lock, &deadline) != 0) break;
        pthread_mutex_unlock(&gate_lock);
    }
    size_t len = atomic_load(&init_reply_len);
    if (len <= 1 || len > cap) return 0;
    memcpy(out, init_reply, len);
    return len;
}

static const struct kernel_init_in *init_arguments(const void *init, size_t len) {
    if (len < sizeof(struct kernel_in_header) + sizeof(struct kernel_init_in)) return NULL;
    const struct kernel_in_header *in = init;
    if (in->opcode != KERNEL_FUSE_INIT) return NULL;
    return (const struct kernel_init_in *)((const unsigned char *)init + sizeof(struct kernel_in_header));
}

int cfc_init_offers_resend(const void *init, size_t len) {
    const struct kernel_init_in *arg = init_arguments(init, len);
    if (!arg || arg->major != 7 || arg->minor < 40) return 0;
    if (!(arg->flags & KERNEL_FUSE_INIT_EXT)) return 0;
    return (arg->flags2 & KERNEL_FUSE_HAS_RESEND_HIGH) != 0;
}

int cfc_notify_resend(int fd) {
    struct kernel_out_header out = { .len = sizeof out, .error = KERNEL_FUSE_NOTIFY_RESEND, .unique = 0 };
    ssize_t n = write(fd, &out, sizeof out);
    return n == (ssize_t)sizeof out ? 0 : -1;
}
