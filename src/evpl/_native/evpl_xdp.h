/* AF_XDP for the xdp_udp backend (xdp.pyx): a thin layer over libxdp's xsk
 * API and libbpf, plus the Ethernet/IPv4/UDP and Ethernet/IPv6/UDP parsing
 * and building that runs per frame. Built with EVPL_HAVE_LIBXDP when setup.py finds libxdp, libbpf
 * and clang; otherwise every entry point is a stub and evpl_xdp_probe()
 * says why the backend is unavailable. */
#ifndef EVPL_XDP_H
#define EVPL_XDP_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/if_link.h>          /* XDP_ATTACHED_* (linux-libc-dev, always there) */

#define EVPL_XDP_MAXQ 64
#define EVPL_XDP_HDR 42             /* Ethernet 14 + IPv4 20 + UDP 8 */
#define EVPL_XDP_HDR6 62            /* Ethernet 14 + IPv6 40 + UDP 8 */

/* what evpl_xdp_parse found in a frame */
enum {
    EVPL_PKT_OK = 0,
    EVPL_PKT_PARTIAL = 1,           /* ok; the UDP checksum was a partial (offload) one */
    EVPL_PKT_NOCSUM = 2,            /* ok; no UDP checksum (0) */
    EVPL_PKT_SHORT = -1,            /* truncated: headers or lengths beyond the frame */
    EVPL_PKT_NOTUDP = -2,           /* not IPv4/IPv6 UDP, a fragment, or a bad IP header */
    EVPL_PKT_BADCSUM = -3,          /* wrong IP or UDP checksum (or none over IPv6) */
    EVPL_PKT_EXTHDR = -4,           /* IPv6 with extension headers (the program passes
                                     * those to the kernel: only a hostile or buggy
                                     * redirect gets here) */
};

typedef struct {
    int family;                     /* 4 or 6 */
    uint32_t saddr, daddr;          /* IPv4, network byte order */
    uint8_t saddr6[16], daddr6[16]; /* IPv6 */
    uint16_t sport, dport;          /* network byte order */
    uint32_t off, len;              /* payload offset in the frame, length */
} evpl_pkt;

/* ---- checksums ---------------------------------------------------------- */

static inline uint32_t evpl_csum_add(uint32_t sum, const void *data, size_t len)
{
    const uint8_t *p = (const uint8_t *)data;
    uint64_t s = sum;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        s += (v & 0xffffffffu) + (v >> 32);
        p += 8;
        len -= 8;
    }
    while (len >= 2) {
        uint16_t v;
        memcpy(&v, p, 2);
        s += v;
        p += 2;
        len -= 2;
    }
    if (len) {
        uint16_t v = 0;
        memcpy(&v, p, 1);
        s += v;
    }
    while (s >> 32)
        s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffffffu) + (s >> 32);
    return (uint32_t)s;
}

static inline uint16_t evpl_csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* the pseudo-header sum of a UDP datagram (addresses in network order) */
static inline uint32_t evpl_pseudo(uint32_t saddr, uint32_t daddr, uint16_t ulen)
{
    uint32_t s = 0;
    uint16_t w[2] = {htons(17), htons(ulen)};
    s = evpl_csum_add(s, &saddr, 4);
    s = evpl_csum_add(s, &daddr, 4);
    return evpl_csum_add(s, w, 4);
}

/* the IPv6 pseudo-header sum (RFC 8200 8.1): the upper-layer length is 32
 * bits there, but a UDP length fits 16, so the sum is the same shape */
static inline uint32_t evpl_pseudo6(const uint8_t *saddr, const uint8_t *daddr, uint16_t ulen)
{
    uint32_t s = 0;
    uint16_t w[2] = {htons(17), htons(ulen)};
    s = evpl_csum_add(s, saddr, 16);
    s = evpl_csum_add(s, daddr, 16);
    return evpl_csum_add(s, w, 4);
}

/* The UDP checksum of a datagram whose pseudo-header sums to ps: verified
 * (OK), a partial one (CHECKSUM_PARTIAL: the sending kernel left the rest
 * to an offload that a veth peer never performs, and the field holds the
 * folded pseudo-header sum), or wrong. */
static inline int evpl_udp_check(uint32_t ps, const uint8_t *udp, uint32_t ulen)
{
    uint16_t check;
    if (evpl_csum_fold(evpl_csum_add(ps, udp, ulen)) == 0xffff)
        return EVPL_PKT_OK;
    memcpy(&check, udp + 6, 2);
    if (check == evpl_csum_fold(ps))
        return EVPL_PKT_PARTIAL;
    return EVPL_PKT_BADCSUM;
}

/* Ethernet + IPv6 + UDP (f: the frame, flen >= 14). A UDP checksum is
 * mandatory over IPv6: 0 is a bad one (RFC 8200 8.1). Only UDP right after
 * the fixed header is taken (EVPL_PKT_EXTHDR otherwise). */
static inline int evpl_xdp_parse6(const uint8_t *f, uint32_t flen, evpl_pkt *out)
{
    const uint8_t *ip = f + 14, *udp = f + 54;
    uint32_t plen, ulen;
    if (flen < 14 + 40)
        return EVPL_PKT_SHORT;
    if ((ip[0] >> 4) != 6)
        return EVPL_PKT_NOTUDP;
    switch (ip[6]) {
    case 17:
        break;
    case 0: case 43: case 44: case 50: case 51: case 60: case 135: case 139: case 140:
    case 253: case 254:             /* the extension headers (IANA's list) */
        return EVPL_PKT_EXTHDR;
    default:
        return EVPL_PKT_NOTUDP;
    }
    plen = ((uint32_t)ip[4] << 8) | ip[5];
    if (flen < 14 + 40 + 8 || plen < 8 || 14 + 40 + plen > flen)
        return EVPL_PKT_SHORT;      /* plen 0 (a jumbogram) needs a hop-by-hop header */
    ulen = ((uint32_t)udp[4] << 8) | udp[5];
    if (ulen < 8 || ulen > plen)
        return EVPL_PKT_SHORT;
    if (ip[8] == 0xff)
        return EVPL_PKT_NOTUDP;     /* a multicast source is invalid (RFC 4291 2.7) */
    out->family = 6;
    memcpy(out->saddr6, ip + 8, 16);
    memcpy(out->daddr6, ip + 24, 16);
    memcpy(&out->sport, udp, 2);
    memcpy(&out->dport, udp + 2, 2);
    out->off = 14 + 40 + 8;
    out->len = ulen - 8;
    if (udp[6] == 0 && udp[7] == 0)
        return EVPL_PKT_BADCSUM;
    return evpl_udp_check(evpl_pseudo6(out->saddr6, out->daddr6, (uint16_t)ulen), udp, ulen);
}

/* Parse an Ethernet + IPv4 + UDP or Ethernet + IPv6 + UDP frame. A partial
 * UDP checksum (see evpl_udp_check) is accepted as EVPL_PKT_PARTIAL; over
 * IPv4 a 0 checksum means none (EVPL_PKT_NOCSUM). */
static inline int evpl_xdp_parse(const uint8_t *f, uint32_t flen, evpl_pkt *out)
{
    const uint8_t *ip, *udp;
    uint32_t ihl, tot, ulen;
    if (flen < 14)
        return EVPL_PKT_SHORT;
    if (f[12] == 0x86 && f[13] == 0xdd)
        return evpl_xdp_parse6(f, flen, out);
    if (flen < 14 + 20)
        return EVPL_PKT_SHORT;
    if (f[12] != 0x08 || f[13] != 0x00)
        return EVPL_PKT_NOTUDP;
    ip = f + 14;
    ihl = (ip[0] & 0x0f) * 4u;
    if ((ip[0] >> 4) != 4 || ihl < 20 || ip[9] != 17)
        return EVPL_PKT_NOTUDP;
    if (((ip[6] & 0x3f) | ip[7]) != 0)        /* MF or a fragment offset */
        return EVPL_PKT_NOTUDP;
    tot = ((uint32_t)ip[2] << 8) | ip[3];
    if (14 + ihl + 8 > flen || tot < ihl + 8 || 14 + tot > flen)
        return EVPL_PKT_SHORT;
    if (evpl_csum_fold(evpl_csum_add(0, ip, ihl)) != 0xffff)
        return EVPL_PKT_BADCSUM;
    udp = ip + ihl;
    ulen = ((uint32_t)udp[4] << 8) | udp[5];
    if (ulen < 8 || ulen > tot - ihl)
        return EVPL_PKT_SHORT;
    out->family = 4;
    memcpy(&out->saddr, ip + 12, 4);
    memcpy(&out->daddr, ip + 16, 4);
    memcpy(&out->sport, udp, 2);
    memcpy(&out->dport, udp + 2, 2);
    out->off = 14 + ihl + 8;
    out->len = ulen - 8;
    if (udp[6] == 0 && udp[7] == 0)
        return EVPL_PKT_NOCSUM;
    return evpl_udp_check(evpl_pseudo(out->saddr, out->daddr, (uint16_t)ulen), udp, ulen);
}

/* Write the 42 header bytes of a frame at h, for the payload that follows
 * them at h + 42 (plen bytes): full IPv4 header and UDP checksums. */
static inline void evpl_xdp_build(uint8_t *h, const uint8_t *dmac, const uint8_t *smac,
                                  uint32_t saddr, uint32_t daddr, uint16_t sport,
                                  uint16_t dport, uint32_t plen, uint16_t id)
{
    uint8_t *ip = h + 14, *udp = h + 34;
    uint16_t tot = (uint16_t)(plen + 28), ulen = (uint16_t)(plen + 8), c;
    uint32_t s;
    memcpy(h, dmac, 6);
    memcpy(h + 6, smac, 6);
    h[12] = 0x08;
    h[13] = 0x00;
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2] = tot >> 8;
    ip[3] = tot & 0xff;
    ip[4] = id >> 8;
    ip[5] = id & 0xff;
    ip[6] = 0x40;                   /* DF: evpl never fragments */
    ip[7] = 0;
    ip[8] = 64;
    ip[9] = 17;
    ip[10] = ip[11] = 0;
    memcpy(ip + 12, &saddr, 4);
    memcpy(ip + 16, &daddr, 4);
    c = (uint16_t)~evpl_csum_fold(evpl_csum_add(0, ip, 20));
    memcpy(ip + 10, &c, 2);
    memcpy(udp, &sport, 2);
    memcpy(udp + 2, &dport, 2);
    udp[4] = ulen >> 8;
    udp[5] = ulen & 0xff;
    udp[6] = udp[7] = 0;
    s = evpl_csum_add(evpl_pseudo(saddr, daddr, ulen), udp, ulen);
    c = (uint16_t)~evpl_csum_fold(s);
    if (c == 0)
        c = 0xffff;                 /* 0 means "no checksum" */
    memcpy(udp + 6, &c, 2);
}

/* Write the 62 header bytes of an IPv6 frame at h, for the payload that
 * follows them at h + 62 (plen bytes): hop limit 64, no flow label, the
 * (mandatory) UDP checksum in full. */
static inline void evpl_xdp_build6(uint8_t *h, const uint8_t *dmac, const uint8_t *smac,
                                   const uint8_t *saddr, const uint8_t *daddr, uint16_t sport,
                                   uint16_t dport, uint32_t plen)
{
    uint8_t *ip = h + 14, *udp = h + 54;
    uint16_t ulen = (uint16_t)(plen + 8), c;
    memcpy(h, dmac, 6);
    memcpy(h + 6, smac, 6);
    h[12] = 0x86;
    h[13] = 0xdd;
    ip[0] = 0x60;
    ip[1] = ip[2] = ip[3] = 0;
    ip[4] = ulen >> 8;
    ip[5] = ulen & 0xff;
    ip[6] = 17;
    ip[7] = 64;
    memcpy(ip + 8, saddr, 16);
    memcpy(ip + 24, daddr, 16);
    memcpy(udp, &sport, 2);
    memcpy(udp + 2, &dport, 2);
    udp[4] = ulen >> 8;
    udp[5] = ulen & 0xff;
    udp[6] = udp[7] = 0;
    c = (uint16_t)~evpl_csum_fold(evpl_csum_add(evpl_pseudo6(saddr, daddr, ulen), udp, ulen));
    if (c == 0)
        c = 0xffff;
    memcpy(udp + 6, &c, 2);
}

/* A socket filter that drops everything: the kernel socket that reserves a
 * Bind's port never queues what the kernel itself would deliver to it. */
static int evpl_xdp_drop_all(int fd)
{
    struct { uint16_t code; uint8_t jt, jf; uint32_t k; } ret0 = {0x06, 0, 0, 0};
    struct { unsigned short len; void *filter; } prog = {1, &ret0};
    return setsockopt(fd, SOL_SOCKET, 26 /* SO_ATTACH_FILTER */, &prog, sizeof(prog));
}

#ifdef EVPL_HAVE_LIBXDP

#include <linux/if_xdp.h>
#include <net/if.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <xdp/xsk.h>
#include "evpl_xdp_prog.h"          /* evpl_xdp_prog[], generated by setup.py */

#define EVPL_XDP_PROG_NAME "evpl_xdp_udp"

typedef struct {
    struct xsk_socket *xsk;
    struct xsk_ring_cons rx, comp;
    struct xsk_ring_prod tx, fill;
    int fd;
    uint32_t tx_pending;            /* reserved in the TX ring, not yet submitted */
} evpl_xsq;

typedef struct {
    int ifindex;
    int nq;
    int zerocopy;                   /* the sockets were bound with XDP_ZEROCOPY */
    int attach_mode;                /* XDP_ATTACHED_DRV or XDP_ATTACHED_SKB */
    int epfd;                       /* every socket's fd, for the loop to sleep on */
    int ports_fd, xsks_fd;
    int stale_detached;             /* a stale evpl program was removed at start */
    uint32_t tx_out;                /* frames sent, completion not yet reaped */
    uint32_t tx_budget;             /* frames one sendto sends in copy mode */
    uint64_t tx_wakeups;            /* sendto calls */
    struct bpf_object *obj;
    int link_fd;                    /* the bpf_link: closing it detaches the program */
    struct xsk_umem *umem;
    evpl_xsq q[EVPL_XDP_MAXQ];
} evpl_xdp;

struct evpl_port_key {             /* as in bpf/evpl_xdp.bpf.c */
    uint32_t addr[4];
    uint16_t port;
    uint8_t family;
    uint8_t pad;
};

static int evpl_libbpf_quiet(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    (void)level; (void)fmt; (void)ap;
    return 0;
}

static const char *evpl_xdp_probe(void) { return NULL; }

static const unsigned char *evpl_xdp_object(size_t *len)
{
    *len = sizeof(evpl_xdp_prog);
    return evpl_xdp_prog;
}

/* The program attached to ifindex (0 if none) and how it is attached. */
static uint32_t evpl_xdp_attached(int ifindex, int *mode)
{
    LIBBPF_OPTS(bpf_xdp_query_opts, q);
    if (bpf_xdp_query(ifindex, 0, &q) < 0)
        return 0;
    *mode = q.attach_mode;
    if (q.attach_mode == XDP_ATTACHED_DRV)
        return q.drv_prog_id;
    if (q.attach_mode == XDP_ATTACHED_SKB)
        return q.skb_prog_id;
    if (q.attach_mode == XDP_ATTACHED_HW)
        return q.hw_prog_id;
    return q.prog_id;
}

static int evpl_xdp_prog_name(uint32_t id, char *name, size_t n)
{
    struct bpf_prog_info info;
    uint32_t len = sizeof(info);
    int fd = bpf_prog_get_fd_by_id(id), err;
    if (fd < 0)
        return -errno;
    memset(&info, 0, sizeof(info));
    err = bpf_obj_get_info_by_fd(fd, &info, &len);
    close(fd);
    if (err < 0)
        return -errno;
    snprintf(name, n, "%s", info.name);
    return 0;
}

/* Remove a program of evpl's attached the legacy way (netlink) that nobody
 * owns; a link-attached one belongs to a live process (its link goes away
 * with the process). Returns 1 if one was removed, 0 if there was none, or
 * -1 with the reason in err. */
static int evpl_xdp_clear_stale(int ifindex, const char *ifname, char *err, size_t errlen)
{
    int mode = 0, r;
    char name[32] = "";
    uint32_t id = evpl_xdp_attached(ifindex, &mode);
    if (id == 0)
        return 0;
    evpl_xdp_prog_name(id, name, sizeof(name));
    if (strcmp(name, EVPL_XDP_PROG_NAME) != 0) {
        snprintf(err, errlen, "interface %s already has an XDP program (id %u, %s): evpl "
                 "does not replace a program it did not load (detach it with "
                 "`ip link set dev %s xdp off`)", ifname, id, name[0] ? name : "no name",
                 ifname);
        return -1;
    }
    {
        LIBBPF_OPTS(bpf_xdp_attach_opts, o);
        int fd = bpf_prog_get_fd_by_id(id);
        o.old_prog_fd = fd;
        r = bpf_xdp_detach(ifindex, (mode == XDP_ATTACHED_SKB ? XDP_FLAGS_SKB_MODE :
                                     XDP_FLAGS_DRV_MODE) | XDP_FLAGS_REPLACE, &o);
        if (fd >= 0)
            close(fd);
    }
    if (r < 0) {
        snprintf(err, errlen, "interface %s is in use by evpl's XDP program of another "
                 "process (program id %u): one process per interface", ifname, id);
        return -1;
    }
    return 1;
}

static void evpl_xdp_close(evpl_xdp *x)
{
    int i;
    if (x == NULL)
        return;
    for (i = 0; i < x->nq; i++)
        if (x->q[i].xsk)
            xsk_socket__delete(x->q[i].xsk);
    if (x->umem)
        xsk_umem__delete(x->umem);
    if (x->link_fd >= 0)
        close(x->link_fd);          /* detaches the program */
    if (x->obj)
        bpf_object__close(x->obj);
    if (x->epfd >= 0)
        close(x->epfd);
    free(x);
}

static int evpl_xdp_sockets(evpl_xdp *x, const char *ifname, void *area, uint64_t size,
                            uint32_t frame, uint32_t ring, int zc, char *err, size_t errlen)
{
    struct xsk_umem_config uc = {
        .fill_size = ring, .comp_size = ring, .frame_size = frame,
        .frame_headroom = 0, .flags = 0,
    };
    struct xsk_socket_config sc;
    int i, r;
    memset(&sc, 0, sizeof(sc));
    sc.rx_size = ring;
    sc.tx_size = ring;
    sc.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD;
    sc.bind_flags = XDP_USE_NEED_WAKEUP | (zc ? XDP_ZEROCOPY : XDP_COPY);
    r = xsk_umem__create(&x->umem, area, size, &x->q[0].fill, &x->q[0].comp, &uc);
    if (r) {
        snprintf(err, errlen, "AF_XDP umem registration failed: %s", strerror(-r));
        return r;
    }
    for (i = 0; i < x->nq; i++) {
        int tries = 0;
        /* EBUSY: the queue is still bound to a socket the kernel is tearing
         * down (its process just died; the release is deferred): wait for
         * it, up to 1 s */
        do {
            if (r == -EBUSY) {
                struct timespec ts = {0, 10 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            if (i == 0)
                r = xsk_socket__create(&x->q[0].xsk, ifname, 0, x->umem, &x->q[0].rx,
                                       &x->q[0].tx, &sc);
            else
                r = xsk_socket__create_shared(&x->q[i].xsk, ifname, i, x->umem,
                                              &x->q[i].rx, &x->q[i].tx, &x->q[i].fill,
                                              &x->q[i].comp, &sc);
        } while (r == -EBUSY && ++tries < 100);
        if (r == -EINVAL && i > 0) {
            /* the interface has fewer queues in use than allocated */
            x->q[i].xsk = NULL;
            x->nq = i;
            break;
        }
        if (r) {
            snprintf(err, errlen, "AF_XDP socket on %s queue %d (%s mode) failed: %s",
                     ifname, i, zc ? "zero-copy" : "copy", strerror(-r));
            return r;
        }
        x->q[i].fd = xsk_socket__fd(x->q[i].xsk);
    }
    return 0;
}

static void evpl_xdp_drop_sockets(evpl_xdp *x)
{
    int i;
    for (i = 0; i < EVPL_XDP_MAXQ; i++) {
        if (x->q[i].xsk)
            xsk_socket__delete(x->q[i].xsk);
        memset(&x->q[i], 0, sizeof(x->q[i]));
    }
    if (x->umem)
        xsk_umem__delete(x->umem);
    x->umem = NULL;
}

/* Sockets on every queue of the interface sharing one UMEM (area, size),
 * zero-copy if the driver takes it, else copy; evpl's program loaded and
 * attached through a bpf_link (native mode, else generic), the sockets in
 * its XSKMAP. NULL with the reason in err. busy_poll: ask for busy polling
 * on the sockets (SO_PREFER_BUSY_POLL), where the kernel allows it. */
#ifndef XDP_MAX_TX_SKB_BUDGET
#define XDP_MAX_TX_SKB_BUDGET 9             /* Linux 6.17 */
#endif

/* Copy mode: let one sendto send up to budget frames (XDP_MAX_TX_SKB_BUDGET,
 * 32..ring; the kernel's default is 32), so a burst of sends takes one
 * wakeup instead of one per 32 frames. Kernels without the option keep 32:
 * the budget in effect is recorded either way. */
static void evpl_xdp_set_tx_budget(evpl_xdp *x, uint32_t budget)
{
    int i;
    x->tx_budget = 32;
    if (x->zerocopy || budget <= 32)
        return;                     /* zero-copy: sendto only wakes the driver */
    for (i = 0; i < x->nq; i++)
        if (setsockopt(x->q[i].fd, SOL_XDP, XDP_MAX_TX_SKB_BUDGET, &budget,
                       sizeof(budget)) < 0)
            return;
    x->tx_budget = budget;
}

static evpl_xdp *evpl_xdp_open(const char *ifname, int nq, void *area, uint64_t size,
                               uint32_t frame, uint32_t ring, int busy_poll, char *err,
                               size_t errlen)
{
    evpl_xdp *x;
    struct bpf_program *prog;
    int i, r, mode = 0;
    size_t objlen;
    const unsigned char *obj = evpl_xdp_object(&objlen);
    libbpf_set_print(evpl_libbpf_quiet);
    if (nq < 1 || nq > EVPL_XDP_MAXQ) {
        snprintf(err, errlen, "%d receive queues: evpl handles 1..%d", nq, EVPL_XDP_MAXQ);
        return NULL;
    }
    x = calloc(1, sizeof(*x));
    if (x == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    x->epfd = -1;
    x->link_fd = -1;
    x->nq = nq;
    x->ifindex = (int)if_nametoindex(ifname);
    if (x->ifindex == 0) {
        snprintf(err, errlen, "no interface %s in this network namespace", ifname);
        goto fail;
    }
    r = evpl_xdp_clear_stale(x->ifindex, ifname, err, errlen);
    if (r < 0)
        goto fail;
    x->stale_detached = r;
    x->obj = bpf_object__open_mem(obj, objlen, NULL);
    if (x->obj == NULL) {
        snprintf(err, errlen, "cannot open evpl's XDP program: %s", strerror(errno));
        goto fail;
    }
    if ((r = bpf_object__load(x->obj)) < 0) {
        snprintf(err, errlen, "cannot load evpl's XDP program: %s (CAP_BPF and "
                 "CAP_NET_ADMIN are needed)", strerror(-r));
        goto fail;
    }
    prog = bpf_object__find_program_by_name(x->obj, EVPL_XDP_PROG_NAME);
    x->ports_fd = bpf_object__find_map_fd_by_name(x->obj, "evpl_ports");
    x->xsks_fd = bpf_object__find_map_fd_by_name(x->obj, "evpl_xsks");
    if (prog == NULL || x->ports_fd < 0 || x->xsks_fd < 0) {
        snprintf(err, errlen, "evpl's XDP program object is incomplete");
        goto fail;
    }
    /* sockets before the program: frames are redirected only once a socket
     * is in the map, the rest are passed until then */
    r = evpl_xdp_sockets(x, ifname, area, size, frame, ring, 1, err, errlen);
    if (r) {
        evpl_xdp_drop_sockets(x);
        x->nq = nq;
        r = evpl_xdp_sockets(x, ifname, area, size, frame, ring, 0, err, errlen);
        if (r)
            goto fail;
    } else {
        x->zerocopy = 1;
    }
    x->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (x->epfd < 0) {
        snprintf(err, errlen, "epoll_create1: %s", strerror(errno));
        goto fail;
    }
    for (i = 0; i < x->nq; i++) {
        uint32_t key = (uint32_t)i;
        int fd = x->q[i].fd;
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u32 = (uint32_t)i;
        if (bpf_map_update_elem(x->xsks_fd, &key, &fd, 0) < 0) {
            snprintf(err, errlen, "XSKMAP update: %s", strerror(errno));
            goto fail;
        }
        if (epoll_ctl(x->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            snprintf(err, errlen, "epoll_ctl: %s", strerror(errno));
            goto fail;
        }
        if (busy_poll) {
            int one = 1, us = 20, budget = 64;
            setsockopt(fd, SOL_SOCKET, 69 /* SO_PREFER_BUSY_POLL */, &one, sizeof(one));
            setsockopt(fd, SOL_SOCKET, 46 /* SO_BUSY_POLL */, &us, sizeof(us));
            setsockopt(fd, SOL_SOCKET, 70 /* SO_BUSY_POLL_BUDGET */, &budget, sizeof(budget));
        }
    }
    {
        /* a link, not a netlink attachment: the kernel detaches the program
         * when the last reference to the link goes, so a crashed process
         * leaves nothing behind. Native mode first, then generic. */
        LIBBPF_OPTS(bpf_link_create_opts, lo);
        lo.flags = XDP_FLAGS_DRV_MODE;
        x->link_fd = bpf_link_create(bpf_program__fd(prog), x->ifindex, BPF_XDP, &lo);
        if (x->link_fd < 0) {
            lo.flags = XDP_FLAGS_SKB_MODE;
            x->link_fd = bpf_link_create(bpf_program__fd(prog), x->ifindex, BPF_XDP, &lo);
        }
        if (x->link_fd < 0) {
            snprintf(err, errlen, "cannot attach evpl's XDP program to %s: %s", ifname,
                     strerror(errno));
            goto fail;
        }
    }
    evpl_xdp_attached(x->ifindex, &mode);
    x->attach_mode = mode;
    return x;
fail:
    evpl_xdp_close(x);
    return NULL;
}

/* ---- the rings (all called by the loop's thread) ------------------------ */

/* the loop's "has work" check while it spins: a frame received, or a send
 * completed while sends are outstanding */
static int evpl_xdp_ready(void *ctx)
{
    evpl_xdp *x = (evpl_xdp *)ctx;
    int i;
    for (i = 0; i < x->nq; i++) {
        if (xsk_cons_nb_avail(&x->q[i].rx, 1))
            return 1;
        if (x->tx_out && xsk_cons_nb_avail(&x->q[i].comp, 1))
            return 1;
    }
    return 0;
}

/* Up to max received descriptors of queue q (addresses with their offset). */
static int evpl_xdp_rx(evpl_xdp *x, int q, uint64_t *addr, uint32_t *len, int max)
{
    uint32_t idx = 0, n, i;
    n = xsk_ring_cons__peek(&x->q[q].rx, (uint32_t)max, &idx);
    for (i = 0; i < n; i++) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(&x->q[q].rx, idx + i);
        addr[i] = d->addr;
        len[i] = d->len;
    }
    if (n)
        xsk_ring_cons__release(&x->q[q].rx, n);
    return (int)n;
}

static uint32_t evpl_xdp_fill_free(evpl_xdp *x, int q)
{
    return xsk_prod_nb_free(&x->q[q].fill, x->q[q].fill.size);
}

/* Give frames (offsets in the UMEM) to queue q's fill ring: all or none. */
static int evpl_xdp_fill(evpl_xdp *x, int q, uint64_t first, uint32_t stride, uint32_t n)
{
    uint32_t idx = 0, i;
    if (xsk_ring_prod__reserve(&x->q[q].fill, n, &idx) != n)
        return 0;
    for (i = 0; i < n; i++)
        *xsk_ring_prod__fill_addr(&x->q[q].fill, idx + i) = first + (uint64_t)i * stride;
    xsk_ring_prod__submit(&x->q[q].fill, n);
    return (int)n;
}

/* the fill ring asks for a wakeup (copy mode, or a driver that sleeps) */
static void evpl_xdp_kick_rx(evpl_xdp *x, int q)
{
    if (xsk_ring_prod__needs_wakeup(&x->q[q].fill))
        recvfrom(x->q[q].fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
}

static uint32_t evpl_xdp_tx_free(evpl_xdp *x, int q)
{
    return xsk_prod_nb_free(&x->q[q].tx, x->q[q].tx.size);
}

/* Queue one frame for sending on queue q; 0 if the TX ring is full. */
static int evpl_xdp_tx(evpl_xdp *x, int q, uint64_t addr, uint32_t len)
{
    uint32_t idx = 0;
    struct xdp_desc *d;
    if (xsk_ring_prod__reserve(&x->q[q].tx, 1, &idx) != 1)
        return 0;
    d = xsk_ring_prod__tx_desc(&x->q[q].tx, idx);
    d->addr = addr;
    d->len = len;
    d->options = 0;
    x->q[q].tx_pending++;
    x->tx_out++;
    return 1;
}

/* Publish the frames queued on q and wake the kernel while it asks and has
 * frames left to send: in copy mode each sendto sends a batch (tx_budget
 * frames), so a ring fuller than that takes several. Errors other than "try later"
 * are returned (negative errno). */
static int evpl_xdp_tx_flush(evpl_xdp *x, int q)
{
    struct xsk_ring_prod *tx = &x->q[q].tx;
    int k;
    if (x->q[q].tx_pending) {
        xsk_ring_prod__submit(tx, x->q[q].tx_pending);
        x->q[q].tx_pending = 0;
    }
    for (k = 0; k < 128 && x->tx_out; k++) {
        uint32_t before = xsk_prod_nb_free(tx, tx->size);
        if (!xsk_ring_prod__needs_wakeup(tx) || before == tx->size)
            break;                  /* the kernel sends on its own, or took everything */
        /* EAGAIN: a batch was sent and more is left, or no room to complete */
        x->tx_wakeups++;
        if (sendto(x->q[q].fd, NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno != EAGAIN
                && errno != EBUSY && errno != ENOBUFS && errno != EINTR)
            return -errno;
        if (xsk_prod_nb_free(tx, tx->size) == before)
            break;                  /* no progress: the device or the completion ring is full */
    }
    return 0;
}

/* Up to max completed send addresses of queue q. */
static int evpl_xdp_comp(evpl_xdp *x, int q, uint64_t *addr, int max)
{
    uint32_t idx = 0, n, i;
    n = xsk_ring_cons__peek(&x->q[q].comp, (uint32_t)max, &idx);
    for (i = 0; i < n; i++)
        addr[i] = *xsk_ring_cons__comp_addr(&x->q[q].comp, idx + i);
    if (n) {
        xsk_ring_cons__release(&x->q[q].comp, n);
        x->tx_out -= n;
    }
    return (int)n;
}

/* Redirect (add) or stop redirecting UDP to (addr, port) of the family
 * (addr: 4 or 16 bytes, network order; all zero: any address). */
static int evpl_xdp_port(evpl_xdp *x, int family, const uint8_t *addr, uint16_t port, int add)
{
    struct evpl_port_key k;
    uint32_t one = 1;
    memset(&k, 0, sizeof(k));
    memcpy(k.addr, addr, family == 6 ? 16 : 4);
    k.port = port;
    k.family = (uint8_t)family;
    int r = add ? bpf_map_update_elem(x->ports_fd, &k, &one, 0)
                : bpf_map_delete_elem(x->ports_fd, &k);
    return r < 0 ? -errno : 0;
}

/* the kernel's counters of queue q (XDP_STATISTICS) */
static int evpl_xdp_kstats(evpl_xdp *x, int q, uint64_t out[6])
{
    struct xdp_statistics st;
    socklen_t len = sizeof(st);
    memset(&st, 0, sizeof(st));
    if (getsockopt(x->q[q].fd, SOL_XDP, XDP_STATISTICS, &st, &len) < 0)
        return -errno;
    out[0] = st.rx_dropped;
    out[1] = st.rx_invalid_descs;
    out[2] = st.tx_invalid_descs;
    out[3] = st.rx_ring_full;
    out[4] = st.rx_fill_ring_empty_descs;
    out[5] = st.tx_ring_empty_descs;
    return 0;
}

#else  /* no libxdp: the backend reports itself unavailable */

typedef struct {
    int ifindex, nq, zerocopy, attach_mode, epfd, stale_detached;
    uint32_t tx_out, tx_budget;
    uint64_t tx_wakeups;
} evpl_xdp;

static const char *evpl_xdp_probe(void)
{
    return "evpl was built without AF_XDP support (install libxdp-dev, libbpf-dev and clang, "
           "then rebuild evpl)";
}
static const unsigned char *evpl_xdp_object(size_t *len) { *len = 0; return NULL; }
static void evpl_xdp_close(evpl_xdp *x) { (void)x; }
static void evpl_xdp_set_tx_budget(evpl_xdp *x, uint32_t budget) { (void)x; (void)budget; }
static evpl_xdp *evpl_xdp_open(const char *ifname, int nq, void *area, uint64_t size,
                               uint32_t frame, uint32_t ring, int busy_poll, char *err,
                               size_t errlen)
{
    (void)ifname; (void)nq; (void)area; (void)size; (void)frame; (void)ring; (void)busy_poll;
    snprintf(err, errlen, "%s", evpl_xdp_probe());
    return NULL;
}
static int evpl_xdp_ready(void *ctx) { (void)ctx; return 0; }
static int evpl_xdp_rx(evpl_xdp *x, int q, uint64_t *a, uint32_t *l, int m) { return 0; }
static uint32_t evpl_xdp_fill_free(evpl_xdp *x, int q) { return 0; }
static int evpl_xdp_fill(evpl_xdp *x, int q, uint64_t f, uint32_t s, uint32_t n) { return 0; }
static void evpl_xdp_kick_rx(evpl_xdp *x, int q) { }
static uint32_t evpl_xdp_tx_free(evpl_xdp *x, int q) { return 0; }
static int evpl_xdp_tx(evpl_xdp *x, int q, uint64_t a, uint32_t l) { return 0; }
static int evpl_xdp_tx_flush(evpl_xdp *x, int q) { return 0; }
static int evpl_xdp_comp(evpl_xdp *x, int q, uint64_t *a, int m) { return 0; }
static int evpl_xdp_port(evpl_xdp *x, int f, const uint8_t *a, uint16_t p, int add)
{
    return -ENOSYS;
}
static int evpl_xdp_kstats(evpl_xdp *x, int q, uint64_t out[6]) { return -ENOSYS; }

#endif /* EVPL_HAVE_LIBXDP */
#endif /* EVPL_XDP_H */
