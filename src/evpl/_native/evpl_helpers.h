/* Small C helpers for the evpl native engine: atomics, byte order, and the
 * syscalls glibc or Debian's headers do not wrap in the form we need. */
#ifndef EVPL_HELPERS_H
#define EVPL_HELPERS_H

#include <stdint.h>
#include <endian.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/epoll.h>
#include <signal.h>
#include <sys/socket.h>
#include <netinet/in.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

static inline int evpl_xchg(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
static inline int evpl_load(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void evpl_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline int64_t evpl_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Read an unsigned integer of `size` bytes (1, 2, 4 or 8). */
static inline uint64_t evpl_load_uint(const unsigned char *p, int size, int big) {
    uint64_t v = 0;
    uint32_t v32;
    int i;
    if (size == 4) {                    /* the common prefix: one load */
        memcpy(&v32, p, 4);
        return big ? be32toh(v32) : le32toh(v32);
    }
    if (big) {
        for (i = 0; i < size; i++) v = (v << 8) | p[i];
    } else {
        for (i = size - 1; i >= 0; i--) v = (v << 8) | p[i];
    }
    return v;
}

static inline void evpl_store_uint(unsigned char *p, int size, int big, uint64_t v) {
    uint32_t v32;
    int i;
    if (size == 4) {
        v32 = big ? htobe32((uint32_t)v) : htole32((uint32_t)v);
        memcpy(p, &v32, 4);
        return;
    }
    if (big) {
        for (i = size - 1; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; }
    } else {
        for (i = 0; i < size; i++) { p[i] = (unsigned char)v; v >>= 8; }
    }
}

/* epoll_pwait2 gives nanosecond timeouts (Linux 5.11); fall back to
 * epoll_wait with the timeout rounded up to whole milliseconds, so timers are
 * never early. timeout_ns < 0 waits forever. */
static int evpl_have_pwait2 = 1;
static inline int evpl_epoll_wait_ns(int epfd, struct epoll_event *ev, int max, int64_t timeout_ns) {
#ifdef SYS_epoll_pwait2
    if (evpl_have_pwait2) {
        struct timespec ts, *tsp = NULL;
        if (timeout_ns >= 0) {
            ts.tv_sec = timeout_ns / 1000000000LL;
            ts.tv_nsec = timeout_ns % 1000000000LL;
            tsp = &ts;
        }
        long r = syscall(SYS_epoll_pwait2, epfd, ev, max, tsp, NULL, (size_t)(_NSIG / 8));
        if (r >= 0 || errno != ENOSYS) return (int)r;
        evpl_have_pwait2 = 0;
    }
#endif
    int ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);
    return epoll_wait(epfd, ev, max, ms);
}

/* UDP GSO: a control message asking the kernel to cut the payload of one
 * sendmsg into datagrams of `seg` bytes (the last may be shorter). `ctl` must
 * hold EVPL_GSO_CTL bytes, 8-byte aligned. */
#define EVPL_GSO_CTL 24
static inline void evpl_set_gso(struct msghdr *mh, void *ctl, uint16_t seg) {
    struct cmsghdr *cm = (struct cmsghdr *)ctl;
    memset(ctl, 0, EVPL_GSO_CTL);
    cm->cmsg_level = IPPROTO_UDP;
    cm->cmsg_type = UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(cm), &seg, sizeof(seg));
    mh->msg_control = ctl;
    mh->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
}

/* UDP GRO: the segment size of a received train the kernel coalesced, from
 * the control bytes of one recvmsg (copied, so any alignment will do); 0 for
 * a plain datagram. Receive control space: EVPL_GRO_CTL bytes. */
#define EVPL_GRO_CTL 24
static inline unsigned evpl_gro_size(const void *ctl, size_t len) {
    uint64_t buf[8];
    struct msghdr mh;
    struct cmsghdr *cm;
    if (len > sizeof(buf)) len = sizeof(buf);
    memcpy(buf, ctl, len);
    memset(&mh, 0, sizeof(mh));
    mh.msg_control = buf;
    mh.msg_controllen = len;
    for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level == IPPROTO_UDP && cm->cmsg_type == UDP_GRO &&
            cm->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int v;
            memcpy(&v, CMSG_DATA(cm), sizeof(v));
            return v > 0 ? (unsigned)v : 0;
        }
    }
    return 0;
}

#endif
