/*
 * echo_epoll.c - the "limit" server for the evpl benchmarks: what a careful
 * single-threaded C program does with epoll on the same loads.
 *
 *   --mode raw     echo bytes: per read one write (TCP)
 *   --mode framed  parse 4-byte big-endian length-prefixed messages (header =
 *                  payload length) and echo each whole message. Every message
 *                  goes through a per-message handler call (through a function
 *                  pointer, so it is not inlined) that appends it to the
 *                  connection's output; the output goes out in one write per
 *                  read, which is what an event loop that flushes at the end
 *                  of an iteration does.
 *   --mode sink    read and discard (for the bulk load)
 *   --mode udp     echo every datagram back to its sender. ONE socket, batched
 *                  with recvmmsg/sendmmsg (64 per call): the usual shape of a
 *                  UDP server (DNS, NFS over UDP), and the same single bound
 *                  port every other stack in the comparison serves.
 *   --spin         never sleep: epoll_wait with a zero timeout (poll mode)
 *
 * Prints "ready PORT" on stdout once it listens (PORT 0 picks a free port).
 * Exits on SIGINT/SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_SIZE (1024 * 1024)  /* raw/sink: one read buffer, like iperf3's -l 1M */
#define FRAMED_READ (64 * 1024)  /* framed: per-connection reassembly buffer growth */
#define MAX_MESSAGE (64u << 20)
#define UDP_BATCH 64
#define UDP_MAX 65536

enum mode { M_RAW, M_FRAMED, M_SINK, M_UDP };

struct buf {
    unsigned char *data;
    size_t len; /* bytes held */
    size_t off; /* bytes already consumed / written */
    size_t cap;
};

struct conn {
    int fd;
    struct buf in;  /* framed: partial message */
    struct buf out; /* bytes not yet written */
};

static enum mode mode = M_RAW;
static int spin;
static int epfd;
static unsigned char rbuf[READ_SIZE];
static volatile sig_atomic_t stop;

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

static void fatal(const char *what) {
    fprintf(stderr, "echo_epoll: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->off > 0 && b->off == b->len) b->off = b->len = 0;
    if (b->len + extra <= b->cap) return;
    if (b->off > 0) { /* compact */
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap) return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    unsigned char *p = realloc(b->data, cap);
    if (!p) {
        fprintf(stderr, "echo_epoll: out of memory\n");
        exit(1);
    }
    b->data = p;
    b->cap = cap;
}

static void buf_append(struct buf *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void conn_close(struct conn *c) {
    close(c->fd); /* also removes it from the epoll set */
    free(c->in.data);
    free(c->out.data);
    free(c);
}

/* The per-message step: echo one message (payload without its header). */
static void __attribute__((noinline)) on_message(struct conn *c, const unsigned char *payload,
                                                 uint32_t len) {
    uint32_t hdr = htonl(len);
    buf_reserve(&c->out, 4 + (size_t)len);
    memcpy(c->out.data + c->out.len, &hdr, 4);
    memcpy(c->out.data + c->out.len + 4, payload, len);
    c->out.len += 4 + (size_t)len;
}
static void (*volatile message_handler)(struct conn *, const unsigned char *, uint32_t) = on_message;

/* Write what is queued; returns -1 if the connection failed. Arms EPOLLOUT
 * (and stops reading) while output is pending. */
static int conn_flush(struct conn *c, int *want_out) {
    while (c->out.off < c->out.len) {
        ssize_t n = send(c->fd, c->out.data + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            return -1;
        }
        c->out.off += (size_t)n;
    }
    int pending = c->out.off < c->out.len;
    if (!pending) c->out.off = c->out.len = 0;
    if (pending != *want_out) {
        *want_out = pending;
        struct epoll_event ev = {.events = pending ? EPOLLOUT : EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) return -1;
    }
    return 0;
}

/* Handle readiness of one connection; returns -1 to close it. */
static int conn_event(struct conn *c, uint32_t events) {
    int want_out = c->out.off < c->out.len;
    if (events & EPOLLOUT) {
        if (conn_flush(c, &want_out) < 0) return -1;
        if (want_out) return 0;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return 0;
    ssize_t n;
    if (mode == M_FRAMED) {
        buf_reserve(&c->in, FRAMED_READ);
        n = recv(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len, 0);
    } else {
        n = recv(c->fd, rbuf, sizeof rbuf, 0);
    }
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    if (n == 0) return -1;
    switch (mode) {
    case M_SINK:
        return 0;
    case M_RAW: {
        /* one write per read; keep the rest if the socket is full */
        ssize_t w = send(c->fd, rbuf, (size_t)n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            w = 0;
        }
        if (w < n) {
            buf_append(&c->out, rbuf + w, (size_t)(n - w));
            return conn_flush(c, &want_out);
        }
        return 0;
    }
    case M_FRAMED: {
        struct buf *in = &c->in;
        in->len += (size_t)n;
        while (in->len - in->off >= 4) {
            uint32_t len;
            memcpy(&len, in->data + in->off, 4);
            len = ntohl(len);
            if (len > MAX_MESSAGE) return -1;
            if (in->len - in->off < 4 + (size_t)len) break;
            message_handler(c, in->data + in->off + 4, len);
            in->off += 4 + (size_t)len;
        }
        if (in->off == in->len) in->off = in->len = 0;
        return conn_flush(c, &want_out);
    }
    case M_UDP:
        break;
    }
    return 0;
}

static int make_socket(const char *host, int port, int type, int *bound_port) {
    struct sockaddr_storage ss;
    socklen_t alen;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        alen = sizeof *sin;
    } else if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        alen = sizeof *sin6;
    } else {
        fprintf(stderr, "echo_epoll: host must be an IP literal: %s\n", host);
        exit(1);
    }
    int fd = socket(ss.ss_family, type | SOCK_NONBLOCK, 0);
    if (fd < 0) fatal("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, alen) < 0) fatal("bind");
    if (type == SOCK_STREAM && listen(fd, 1024) < 0) fatal("listen");
    if (getsockname(fd, (struct sockaddr *)&ss, &alen) < 0) fatal("getsockname");
    *bound_port = ntohs(ss.ss_family == AF_INET ? sin->sin_port : sin6->sin6_port);
    return fd;
}

static void udp_echo(int fd) {
    static struct mmsghdr msgs[UDP_BATCH];
    static struct iovec iov[UDP_BATCH];
    static struct sockaddr_storage addrs[UDP_BATCH];
    static unsigned char data[UDP_BATCH][UDP_MAX];
    for (;;) {
        for (int i = 0; i < UDP_BATCH; i++) {
            iov[i].iov_base = data[i];
            iov[i].iov_len = UDP_MAX;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
        }
        int n = recvmmsg(fd, msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        int sent = 0;
        while (sent < n) {
            int s = sendmmsg(fd, msgs + sent, (unsigned)(n - sent), MSG_DONTWAIT);
            if (s <= 0) break; /* socket buffer full: drop, like any UDP server */
            sent += s;
        }
        if (n < UDP_BATCH) return;
    }
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {
        {"mode", required_argument, 0, 'm'},
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"spin", no_argument, 0, 's'},
        {0, 0, 0, 0},
    };
    const char *host = "127.0.0.1";
    int port = 9000;
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'm':
            if (strcmp(optarg, "raw") == 0) mode = M_RAW;
            else if (strcmp(optarg, "framed") == 0) mode = M_FRAMED;
            else if (strcmp(optarg, "sink") == 0) mode = M_SINK;
            else if (strcmp(optarg, "udp") == 0) mode = M_UDP;
            else {
                fprintf(stderr, "echo_epoll: unknown mode %s\n", optarg);
                return 1;
            }
            break;
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 's': spin = 1; break;
        default:
            fprintf(stderr, "usage: echo_epoll [--mode raw|framed|sink|udp] [--host H] "
                            "[--port P] [--spin]\n");
            return 1;
        }
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    epfd = epoll_create1(0);
    if (epfd < 0) fatal("epoll_create1");
    int bound_port;
    int lfd = make_socket(host, port, mode == M_UDP ? SOCK_DGRAM : SOCK_STREAM, &bound_port);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev) < 0) fatal("epoll_ctl");
    printf("ready %d\n", bound_port);
    fflush(stdout);

    struct epoll_event events[256];
    while (!stop) {
        int n = epoll_wait(epfd, events, 256, spin ? 0 : -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            fatal("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *cn = events[i].data.ptr;
            if (cn == NULL) { /* the listening / datagram socket */
                if (mode == M_UDP) {
                    udp_echo(lfd);
                    continue;
                }
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sizeof *nc);
                    if (!nc) {
                        close(fd);
                        continue;
                    }
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
                        close(fd);
                        free(nc);
                    }
                }
                continue;
            }
            if (conn_event(cn, events[i].events) < 0) conn_close(cn);
        }
    }
    return 0;
}
