/* The io_uring side of the evpl engine: a thin layer over liburing, so the
 * Cython engine sees plain functions and a plain completion array.
 *
 * Built with liburing when setup.py finds it (EVPL_HAVE_LIBURING); without it
 * every function reports ENOSYS and the io_uring backends say why they are
 * unavailable. Features newer than Debian's 6.1 headers are defined here and
 * probed at run time. */
#ifndef EVPL_URING_H
#define EVPL_URING_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
#include <sys/socket.h>

typedef struct evpl_cqe {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
} evpl_cqe;

/* newer than the 6.1 headers */
#define EVPL_IOU_PBUF_RING_INC   2u          /* incremental buffer consumption (6.12) */
#define EVPL_CQE_F_BUF_MORE      (1u << 4)   /* buffer partially consumed, more to come */
#define EVPL_CQE_F_MORE          (1u << 1)
#define EVPL_CQE_F_BUFFER        (1u << 0)
#define EVPL_CQE_F_NOTIF         (1u << 3)

#ifdef EVPL_HAVE_LIBURING
#include <liburing.h>
#include <sched.h>

/* One provided-buffer ring; its group id is its index in evpl_uring.br. */
typedef struct evpl_bufring {
    struct io_uring_buf_ring *ring;
    size_t size;
    unsigned mask;
    int pending;        /* added, not yet made visible to the kernel */
} evpl_bufring;

typedef struct evpl_uring {
    struct io_uring ring;
    int evfd;
    /* bgid 0: incremental consumption (stream receives);
     * bgid 1: fixed slots, whole-buffer consumption (datagrams) */
    evpl_bufring br[2];
    unsigned setup_flags;
    int sqpoll;         /* a kernel thread submits: no enter to submit or reap */
} evpl_uring;

/* Create a ring; try SINGLE_ISSUER | DEFER_TASKRUN, then plainer set-ups.
 * With sqpoll, a kernel thread (bound to sqpoll_cpu if >= 0) submits and
 * runs completion work; it sleeps after idle_ms without submissions. */
static evpl_uring *evpl_uring_new(unsigned entries, int sqpoll, int sqpoll_cpu,
                                  unsigned idle_ms, int *err) {
    static const unsigned tries[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    static const unsigned sq_tries[] = {
        IORING_SETUP_SQPOLL | IORING_SETUP_SINGLE_ISSUER,
        IORING_SETUP_SQPOLL,
    };
    const unsigned *flags = sqpoll ? sq_tries : tries;
    unsigned n = sqpoll ? 2 : 3;
    evpl_uring *u = calloc(1, sizeof(*u));
    unsigned i;
    int r = -EINVAL;
    if (!u) { *err = ENOMEM; return NULL; }
    for (i = 0; i < n; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        p.flags = flags[i] | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CQSIZE;
        p.cq_entries = entries * 4;
        if (sqpoll) {
            p.sq_thread_idle = idle_ms;
            if (sqpoll_cpu >= 0) {
                p.flags |= IORING_SETUP_SQ_AFF;
                p.sq_thread_cpu = (unsigned)sqpoll_cpu;
            }
        }
        r = io_uring_queue_init_params(entries, &u->ring, &p);
        if (r == 0) { u->setup_flags = p.flags; break; }
    }
    if (r < 0) { free(u); *err = -r; return NULL; }
    u->sqpoll = sqpoll;
    u->evfd = -1;
    *err = 0;
    return u;
}

static void evpl_uring_free(evpl_uring *u) {
    if (!u) return;
    io_uring_queue_exit(&u->ring);
    for (int g = 0; g < 2; g++)
        if (u->br[g].ring) munmap(u->br[g].ring, u->br[g].size);
    free(u);
}

static int evpl_uring_register_eventfd(evpl_uring *u, int fd) {
    int r = io_uring_register_eventfd(&u->ring, fd);
    if (r == 0) u->evfd = fd;
    return r;
}

/* Turn the eventfd notification on or off (a flag in the shared CQ ring, no
 * syscall): off while the loop polls the CQ itself, on before it sleeps. */
static inline void evpl_uring_evfd_enable(evpl_uring *u, int on) {
    io_uring_cq_eventfd_toggle(&u->ring, on != 0);
}

/* Provided-buffer ring `bgid` (0 or 1). With `inc`, consumption is
 * incremental: one large buffer serves many receives, each continuing where
 * the last one ended. Without, each completion takes a whole buffer: for
 * datagram slots, because with incremental consumption a datagram landing at
 * the tail of a buffer is cut to the bytes left there (MSG_TRUNC). */
static int evpl_uring_setup_bufring(evpl_uring *u, unsigned entries, int bgid, int inc) {
    evpl_bufring *b = &u->br[bgid];
    struct io_uring_buf_reg reg;
    int r;
    b->size = entries * sizeof(struct io_uring_buf);
    if (b->size < 4096) b->size = 4096;
    b->ring = mmap(NULL, b->size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (b->ring == MAP_FAILED) { b->ring = NULL; return -errno; }
    io_uring_buf_ring_init(b->ring);
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)b->ring;
    reg.ring_entries = entries;
    reg.bgid = (unsigned short)bgid;
    if (inc) reg.pad = EVPL_IOU_PBUF_RING_INC;     /* 'flags' in newer headers */
    r = io_uring_register_buf_ring(&u->ring, &reg, 0);
    if (r < 0) { munmap(b->ring, b->size); b->ring = NULL; return r; }
    b->mask = io_uring_buf_ring_mask(entries);
    b->pending = 0;
    return 0;
}

static inline void evpl_uring_buf_add(evpl_uring *u, int bgid, void *addr, unsigned len,
                                      unsigned short bid) {
    evpl_bufring *b = &u->br[bgid];
    io_uring_buf_ring_add(b->ring, addr, len, bid, b->mask, b->pending++);
}

static inline void evpl_uring_buf_commit(evpl_uring *u, int bgid) {
    evpl_bufring *b = &u->br[bgid];
    if (b->pending) {
        io_uring_buf_ring_advance(b->ring, b->pending);
        b->pending = 0;
    }
}

static inline struct io_uring_sqe *evpl_uring_sqe(evpl_uring *u) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (!sqe) {
        io_uring_submit(&u->ring);
        /* an SQPOLL thread takes entries at its own pace: wait for room */
        if (u->sqpoll) io_uring_sqring_wait(&u->ring);
        sqe = io_uring_get_sqe(&u->ring);
    }
    return sqe;
}

static int evpl_uring_recv_multishot(evpl_uring *u, int fd, uint64_t ud, int bgid) {
    struct io_uring_sqe *sqe = evpl_uring_sqe(u);
    if (!sqe) return -EBUSY;
    io_uring_prep_recv_multishot(sqe, fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = (unsigned short)bgid;
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static int evpl_uring_recvmsg_multishot(evpl_uring *u, int fd, struct msghdr *mh,
                                        uint64_t ud, int bgid) {
    struct io_uring_sqe *sqe = evpl_uring_sqe(u);
    if (!sqe) return -EBUSY;
    io_uring_prep_recvmsg_multishot(sqe, fd, mh, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = (unsigned short)bgid;
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static int evpl_uring_sendmsg_dgram(evpl_uring *u, int fd, const struct msghdr *mh, uint64_t ud) {
    struct io_uring_sqe *sqe = evpl_uring_sqe(u);
    if (!sqe) return -EBUSY;
    io_uring_prep_sendmsg(sqe, fd, mh, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static int evpl_uring_accept_multishot(evpl_uring *u, int fd, uint64_t ud) {
    struct io_uring_sqe *sqe = evpl_uring_sqe(u);
    if (!sqe) return -EBUSY;
    io_uring_prep_multishot_accept(sqe, fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static int evpl_uring_sendmsg(evpl_uring *u, int fd, const struct msghdr *mh, uint64_t ud,
                              int zc) {
    struct io_uring_sqe *sqe = evpl_uring_sqe(u);
    if (!sqe) return -EBUSY;
    if (zc)
        io_uring_prep_sendmsg_zc(sqe, fd, mh, MSG_NOSIGNAL | MSG_WAITALL);
    else
        io_uring_prep_sendmsg(sqe, fd, mh, MSG_NOSIGNAL | MSG_WAITALL);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

/* Cancel every request with user_data `target`. On an SQPOLL ring this is
 * synchronous (IORING_REGISTER_SYNC_CANCEL, after the thread has taken what
 * is queued), so that, as after the next submit on other rings, the request
 * is gone when the loop goes on: a paused Bind reads no more, a closed
 * listener accepts no more. */
static int evpl_uring_cancel(evpl_uring *u, uint64_t target, uint64_t ud) {
    if (u->sqpoll) {
        struct io_uring_sync_cancel_reg reg;
        io_uring_submit(&u->ring);
        while (io_uring_sq_ready(&u->ring) > 0)
            sched_yield();
        memset(&reg, 0, sizeof(reg));
        reg.addr = target;
        reg.flags = IORING_ASYNC_CANCEL_ALL;
        reg.timeout.tv_sec = -1;
        reg.timeout.tv_nsec = -1;
        io_uring_register_sync_cancel(&u->ring, &reg);
        return 0;
    }
    struct io_uring_sqe *sqe = evpl_uring_sqe(u);
    if (!sqe) return -EBUSY;
    io_uring_prep_cancel64(sqe, target, IORING_ASYNC_CANCEL_ALL);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

/* Submit what is queued and run deferred completion work (one syscall). */
static inline int evpl_uring_submit(evpl_uring *u) {
    if (u->sqpoll) return io_uring_submit(&u->ring);   /* enters only to wake the thread */
    return io_uring_submit_and_get_events(&u->ring);
}

/* Run pending completion work (DEFER_TASKRUN posts completions only when
 * asked) and say whether completions wait in the CQ ring. */
static inline int evpl_uring_cq_ready(evpl_uring *u) {
    if (io_uring_cq_ready(&u->ring) > 0 || u->sqpoll) return io_uring_cq_ready(&u->ring) > 0;
    io_uring_get_events(&u->ring);
    return io_uring_cq_ready(&u->ring) > 0;
}

/* Copy up to max completions out of the ring and mark them seen. */
static inline int evpl_uring_reap(evpl_uring *u, evpl_cqe *out, int max) {
    struct io_uring_cqe *cqe;
    unsigned head;
    int n = 0;
    io_uring_for_each_cqe(&u->ring, head, cqe) {
        if (n == max) break;
        out[n].user_data = cqe->user_data;
        out[n].res = cqe->res;
        out[n].flags = cqe->flags;
        n++;
    }
    if (n) io_uring_cq_advance(&u->ring, (unsigned)n);
    return n;
}

/* How the ring was set up, for Loop.io_uring_setup. */
static inline const char *evpl_uring_mode(evpl_uring *u) {
    if (u->setup_flags & IORING_SETUP_SQPOLL) return "sqpoll";
    if (u->setup_flags & IORING_SETUP_DEFER_TASKRUN) return "defer_taskrun";
    if (u->setup_flags & IORING_SETUP_COOP_TASKRUN) return "coop_taskrun";
    return "plain";
}

/* Submit and wait up to timeout_ns for at least one completion. */
static inline int evpl_uring_wait(evpl_uring *u, long long timeout_ns) {
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts;
    ts.tv_sec = timeout_ns / 1000000000LL;
    ts.tv_nsec = timeout_ns % 1000000000LL;
    return io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
}

/* Why io_uring networking cannot be used here, or NULL if it can. */
static const char *evpl_uring_probe(void) {
    static char why[160];
    struct io_uring_probe *p;
    evpl_uring *u;
    int err, r;
    u = evpl_uring_new(8, 0, -1, 0, &err);
    if (!u) {
        snprintf(why, sizeof(why), "io_uring_setup failed: %s%s", strerror(err),
                 err == EPERM ? " (kernel.io_uring_disabled or seccomp)" : "");
        return why;
    }
    p = io_uring_get_probe_ring(&u->ring);
    if (!p) { evpl_uring_free(u); return "io_uring opcode probe failed"; }
    if (!io_uring_opcode_supported(p, IORING_OP_SENDMSG_ZC) ||
        !io_uring_opcode_supported(p, IORING_OP_RECV) ||
        !io_uring_opcode_supported(p, IORING_OP_ACCEPT)) {
        io_uring_free_probe(p);
        evpl_uring_free(u);
        return "kernel lacks IORING_OP_SENDMSG_ZC/RECV/ACCEPT (needs Linux 6.1)";
    }
    io_uring_free_probe(p);
    r = evpl_uring_setup_bufring(u, 8, 0, 1);
    evpl_uring_free(u);
    if (r < 0) {
        snprintf(why, sizeof(why),
                 "incremental provided buffer rings unsupported (%s; needs Linux 6.12)",
                 strerror(-r));
        return why;
    }
    return NULL;
}

#else  /* no liburing at build time */

typedef struct evpl_uring { int unused; } evpl_uring;
static evpl_uring *evpl_uring_new(unsigned e, int s, int c, unsigned i, int *err) {
    (void)e; (void)s; (void)c; (void)i; *err = ENOSYS; return NULL;
}
static void evpl_uring_free(evpl_uring *u) { (void)u; }
static int evpl_uring_register_eventfd(evpl_uring *u, int fd) { (void)u; (void)fd; return -ENOSYS; }
static inline void evpl_uring_evfd_enable(evpl_uring *u, int on) { (void)u; (void)on; }
static int evpl_uring_setup_bufring(evpl_uring *u, unsigned e, int g, int i) { (void)u; (void)e; (void)g; (void)i; return -ENOSYS; }
static inline void evpl_uring_buf_add(evpl_uring *u, int g, void *a, unsigned l, unsigned short b) { (void)u; (void)g; (void)a; (void)l; (void)b; }
static inline void evpl_uring_buf_commit(evpl_uring *u, int g) { (void)u; (void)g; }
static int evpl_uring_recvmsg_multishot(evpl_uring *u, int f, struct msghdr *m, uint64_t d, int g) { (void)u; (void)f; (void)m; (void)d; (void)g; return -ENOSYS; }
static int evpl_uring_sendmsg_dgram(evpl_uring *u, int f, const struct msghdr *m, uint64_t d) { (void)u; (void)f; (void)m; (void)d; return -ENOSYS; }
static int evpl_uring_recv_multishot(evpl_uring *u, int f, uint64_t d, int g) { (void)u; (void)f; (void)d; (void)g; return -ENOSYS; }
static int evpl_uring_accept_multishot(evpl_uring *u, int f, uint64_t d) { (void)u; (void)f; (void)d; return -ENOSYS; }
static int evpl_uring_sendmsg(evpl_uring *u, int f, const struct msghdr *m, uint64_t d, int z) { (void)u; (void)f; (void)m; (void)d; (void)z; return -ENOSYS; }
static int evpl_uring_cancel(evpl_uring *u, uint64_t t, uint64_t d) { (void)u; (void)t; (void)d; return -ENOSYS; }
static inline int evpl_uring_submit(evpl_uring *u) { (void)u; return -ENOSYS; }
static inline int evpl_uring_cq_ready(evpl_uring *u) { (void)u; return 0; }
static inline int evpl_uring_reap(evpl_uring *u, evpl_cqe *o, int m) { (void)u; (void)o; (void)m; return 0; }
static inline const char *evpl_uring_mode(evpl_uring *u) { (void)u; return "none"; }
static inline int evpl_uring_wait(evpl_uring *u, long long t) { (void)u; (void)t; return -ENOSYS; }
static const char *evpl_uring_probe(void) {
    return "evpl was built without liburing (install liburing-dev and reinstall evpl)";
}
#endif

#endif
