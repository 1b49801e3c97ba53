/*
 * xsk_echo.c - the C limit for AF_XDP on this machine: a UDP echo server on
 * one AF_XDP socket (libxdp), with no Python and no protocol, to compare with
 * echo_epoll.c's kernel-UDP echo on the same veth pair (xdp_bench.py's
 * "c-udp" and "c-xsk" stacks). What it measures is the kernel path alone:
 * how much faster AF_XDP can be than the socket layer here, so what
 * evpl's xdp_udp (the same path plus Python per datagram) can hope for.
 *
 *   xsk_echo --interface IF --port P [--queue Q] [--spin]
 *
 * It loads libxdp's default program on IF, which redirects every packet of
 * queue Q to the socket: ARP included, so the peer needs a static
 * neighbour entry for this side (xdp_bench.py sets one). An IPv4 UDP
 * datagram to port P goes back to its sender (MAC, IP and port swapped,
 * UDP checksum set to 0: the veth peer sends partial checksums); any other
 * frame is dropped. The driver chooses copy or zero-copy mode (veth: copy).
 * --spin polls the rings without sleeping; otherwise it sleeps in poll().
 *
 * Prints "ready P" on stdout once the socket is bound, and on SIGINT/SIGTERM
 * "stats {...}" on stderr (datagrams in and out) before it exits.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <xdp/xsk.h>

#define NFRAMES 4096
#define FRAME XSK_UMEM__DEFAULT_FRAME_SIZE
#define BATCH 64

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

struct ctx {
    struct xsk_ring_prod fq, tx;
    struct xsk_ring_cons cq, rx;
    struct xsk_socket *xsk;
    char *area;
    uint64_t free_frames[NFRAMES];
    unsigned nfree;
    unsigned long in, out;
};

/* Frames the kernel finished sending go back to the fill ring. */
static void recycle(struct ctx *c) {
    uint32_t idx_cq, idx_fq, n, i;
    n = xsk_ring_cons__peek(&c->cq, BATCH, &idx_cq);
    for (i = 0; i < n; i++)
        c->free_frames[c->nfree++] = *xsk_ring_cons__comp_addr(&c->cq, idx_cq + i);
    if (n)
        xsk_ring_cons__release(&c->cq, n);
    n = xsk_prod_nb_free(&c->fq, c->nfree);
    if (n > c->nfree)
        n = c->nfree;
    if (n && xsk_ring_prod__reserve(&c->fq, n, &idx_fq) == n) {
        for (i = 0; i < n; i++)
            *xsk_ring_prod__fill_addr(&c->fq, idx_fq + i) = c->free_frames[--c->nfree];
        xsk_ring_prod__submit(&c->fq, n);
    }
}

/* Turn an IPv4 UDP datagram to `port` around in place; 0 if it is not one. */
static int reflect(char *p, uint32_t len, uint16_t port) {
    struct ethhdr *eth = (struct ethhdr *)p;
    struct iphdr *ip = (struct iphdr *)(eth + 1);
    struct udphdr *udp;
    unsigned char mac[ETH_ALEN];
    uint32_t a;
    uint16_t s;
    if (len < sizeof(*eth) + sizeof(*ip) + sizeof(*udp) || eth->h_proto != htons(ETH_P_IP)
            || ip->protocol != IPPROTO_UDP || ip->ihl != 5)
        return 0;
    udp = (struct udphdr *)(ip + 1);
    if (udp->dest != port)
        return 0;
    memcpy(mac, eth->h_dest, ETH_ALEN);
    memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    memcpy(eth->h_source, mac, ETH_ALEN);
    a = ip->saddr; ip->saddr = ip->daddr; ip->daddr = a;     /* IP checksum unchanged */
    s = udp->source; udp->source = udp->dest; udp->dest = s;
    udp->check = 0;
    return 1;
}

int main(int argc, char **argv) {
    const char *ifname = NULL;
    int port = 0, queue = 0, spin = 0, opt, i;
    static const struct option longopts[] = {
        {"interface", required_argument, 0, 'i'}, {"port", required_argument, 0, 'p'},
        {"queue", required_argument, 0, 'q'}, {"spin", no_argument, 0, 's'}, {0, 0, 0, 0}};
    struct ctx c;
    struct xsk_umem *umem;
    struct xsk_socket_config cfg;
    struct pollfd pfd;
    struct xdp_desc echo[BATCH];
    uint32_t idx_rx, idx_tx = 0, n, kept, k;
    int err;

    while ((opt = getopt_long(argc, argv, "i:p:q:s", longopts, NULL)) != -1) {
        switch (opt) {
        case 'i': ifname = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'q': queue = atoi(optarg); break;
        case 's': spin = 1; break;
        default:
            fprintf(stderr, "usage: xsk_echo --interface IF --port P [--queue Q] [--spin]\n");
            return 1;
        }
    }
    if (!ifname || port <= 0 || port > 65535) {
        fprintf(stderr, "usage: xsk_echo --interface IF --port P [--queue Q] [--spin]\n");
        return 1;
    }
    memset(&c, 0, sizeof(c));
    c.area = mmap(NULL, (size_t)NFRAMES * FRAME, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (c.area == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    err = xsk_umem__create(&umem, c.area, (uint64_t)NFRAMES * FRAME, &c.fq, &c.cq, NULL);
    if (err) {
        fprintf(stderr, "xsk_umem__create: %s\n", strerror(-err));
        return 1;
    }
    memset(&cfg, 0, sizeof(cfg));
    cfg.rx_size = XSK_RING_CONS__DEFAULT_NUM_DESCS;
    cfg.tx_size = XSK_RING_PROD__DEFAULT_NUM_DESCS;
    cfg.bind_flags = XDP_USE_NEED_WAKEUP;
    err = xsk_socket__create(&c.xsk, ifname, queue, umem, &c.rx, &c.tx, &cfg);
    if (err) {
        fprintf(stderr, "xsk_socket__create on %s: %s\n", ifname, strerror(-err));
        return 1;
    }
    for (i = 0; i < NFRAMES; i++)
        c.free_frames[c.nfree++] = (uint64_t)i * FRAME;
    recycle(&c);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    printf("ready %d\n", port);
    fflush(stdout);
    pfd.fd = xsk_socket__fd(c.xsk);
    pfd.events = POLLIN;
    while (!stop) {
        n = xsk_ring_cons__peek(&c.rx, BATCH, &idx_rx);
        if (!n) {
            recycle(&c);
            if (xsk_ring_prod__needs_wakeup(&c.fq) || !spin)
                poll(&pfd, 1, spin ? 0 : 100);
            continue;
        }
        /* echo in place: each datagram's frame becomes a TX descriptor */
        kept = 0;
        for (k = 0; k < n; k++) {
            const struct xdp_desc *d = xsk_ring_cons__rx_desc(&c.rx, idx_rx + k);
            c.in++;
            if (reflect(xsk_umem__get_data(c.area, d->addr), d->len, htons((uint16_t)port))) {
                echo[kept].addr = d->addr;
                echo[kept++].len = d->len;
            } else {
                c.free_frames[c.nfree++] = d->addr;
            }
        }
        xsk_ring_cons__release(&c.rx, n);
        while (kept && xsk_ring_prod__reserve(&c.tx, kept, &idx_tx) != kept) {
            recycle(&c);
            sendto(pfd.fd, NULL, 0, MSG_DONTWAIT, NULL, 0);
        }
        for (k = 0; k < kept; k++)
            *xsk_ring_prod__tx_desc(&c.tx, idx_tx + k) = echo[k];
        xsk_ring_prod__submit(&c.tx, kept);
        c.out += kept;
        if (xsk_ring_prod__needs_wakeup(&c.tx))
            sendto(pfd.fd, NULL, 0, MSG_DONTWAIT, NULL, 0);
        recycle(&c);
    }
    fprintf(stderr, "stats {\"datagrams_in\": %lu, \"datagrams_out\": %lu}\n", c.in, c.out);
    xsk_socket__delete(c.xsk);
    xsk_umem__delete(umem);
    return 0;
}
