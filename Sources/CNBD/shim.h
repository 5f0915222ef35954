#ifndef MIRRORFS_CNBD_SHIM_H
#define MIRRORFS_CNBD_SHIM_H
/* libnbd.h's NBD_NULL_COMPLETION uses NULL without including what defines it. */
#include <stddef.h>
#include <stdint.h>
#include <libnbd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

/* NBD_NULL_COMPLETION is a compound literal, which Swift does not import. */
static inline nbd_completion_callback cnbd_no_completion(void) {
    nbd_completion_callback callback = { NULL, NULL, NULL };
    return callback;
}

/* A cut link or a silent peer fails the socket after `ms` of unacknowledged data. */
static inline int cnbd_set_tcp_user_timeout(int fd, unsigned ms) {
    return setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
}

/* Abortive close: unsent requests of an abandoned connection are discarded, not sent late. */
static inline int cnbd_set_linger_reset(int fd) {
    struct linger l = { 1, 0 };
    return setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

static inline int cnbd_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

/* The extents of one block-status reply, handed to a Swift collector. */
typedef void (*cnbd_extent_sink)(void *context, uint64_t length, uint32_t flags);

static inline int cnbd_extent_trampoline(void *user_data, const char *metacontext, uint64_t offset,
                                         uint32_t *entries, size_t nr_entries, int *error) {
    (void)offset; (void)error;
    void **pair = (void **)user_data;
    if (metacontext == NULL || __builtin_strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
    for (size_t i = 0; i + 1 < nr_entries; i += 2)
        ((cnbd_extent_sink)pair[0])(pair[1], entries[i], entries[i + 1]);
    return 0;
}

/* Block status of [offset, offset+count) for base:allocation; `pair` = { sink, context }
   must outlive the command. */
static inline int64_t cnbd_aio_block_status(struct nbd_handle *h, uint64_t count, uint64_t offset, void **pair) {
    nbd_extent_callback extent = { cnbd_extent_trampoline, pair, NULL };
    return nbd_aio_block_status(h, count, offset, extent, cnbd_no_completion(), 0);
}
#endif
