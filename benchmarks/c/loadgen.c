/*
 * loadgen.c - single-threaded load generator for the evpl benchmarks.
 *
 * Modes (first positional argument):
 *   pingpong  N TCP connections (default 1), one framed message in flight
 *             per connection; round trips/s and latency percentiles.
 *   pipeline  C connections (default 32) x D framed messages in flight
 *             (default 16); whole echoed messages/s.
 *   raw       same traffic as pipeline, meant for a raw byte-echo server.
 *   bulk      C connections (default 1) writing W-byte writes (default 1 MiB)
 *             to a sink server as fast as possible; Gbit/s.
 *   udp       K UDP sockets (default 8) x F datagrams in flight (default 32)
 *             to a datagram echo server; echoed datagrams/s and losses; with
 *             --depth 1 also the round-trip latency percentiles.
 *
 * A framed message is S bytes in total (default 64): a 4-byte big-endian
 * header holding the payload length (S - 4) followed by the payload. Every
 * message is identical, so the echoed stream is periodic with period S and is
 * checked byte for byte against what was sent (disable with --no-verify).
 *
 * The loop is epoll (level triggered) or, with --spin, a busy poll that tries
 * every socket without sleeping. Latency is taken per message from
 * clock_gettime(CLOCK_MONOTONIC) once per read, into a log-linear histogram
 * (< 1 % bucket error). With --server-pid the server's utime+stime is read
 * from /proc over exactly the measured interval.
 *
 * Output: one JSON line on stdout. Exit status 0 on success, 1 on usage or
 * setup error, 2 when the peer misbehaved (bad echo, closed connection).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BENCH_NAME "loadgen"
#include "bench_common.h"

enum mode { M_PINGPONG, M_PIPELINE, M_RAW, M_BULK, M_UDP };
static const char *mode_names[] = {"pingpong", "pipeline", "raw", "bulk", "udp"};

/* ---------------------------------------------------------------- options */
static struct {
    enum mode mode;
    const char *host;
    int port;
    const char *unix_path;
    int conns;
    int depth;
    int size;
    long write_size;
    double duration;
    double warmup;
    int spin;
    int verify;
    int gso;          /* udp: send each window as UDP GSO trains */
    int gro;          /* udp: let the kernel coalesce received trains (UDP_GRO) */
    int server_pid;
    double udp_timeout;
} opt = {
    .host = "127.0.0.1",
    .port = 9000,
    .conns = -1,
    .depth = -1,
    .size = 64,
    .write_size = 1 << 20,
    .duration = 3.0,
    .warmup = 1.0,
    .verify = 1,
    .udp_timeout = 0.1,
};

/* Report a misbehaving peer as a JSON error line and exit with status 2. */
static void peer_fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void peer_fail(const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "loadgen: %s\n", msg);
    printf("{\"mode\": \"%s\", \"error\": \"%s\"}\n", mode_names[opt.mode], msg);
    fflush(stdout);
    exit(2);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen MODE [options]\n"
            "  MODE: pingpong | pipeline | raw | bulk | udp\n"
            "  --host H          server address (default 127.0.0.1)\n"
            "  --port P          server port (default 9000)\n"
            "  --unix PATH       connect to a unix stream socket instead (TCP modes)\n"
            "  --conns N         connections / UDP sockets\n"
            "                    (pingpong 1, pipeline/raw 32, bulk 1, udp 8)\n"
            "  --depth D         messages in flight per connection/socket\n"
            "                    (pingpong 1, pipeline/raw 16, udp 32)\n"
            "  --size S          message size incl. 4-byte header (default 64)\n"
            "  --write-size W    bulk write size in bytes (default 1048576)\n"
            "  --duration SEC    measured interval (default 3)\n"
            "  --warmup SEC      unmeasured warm-up before it (default 1)\n"
            "  --spin            busy-poll instead of sleeping in epoll_wait\n"
            "  --no-verify       do not check the echoed bytes\n"
            "  --server-pid PID  report that process's CPU time over the interval\n"
            "  --udp-timeout SEC resend a UDP window after this long without\n"
            "                    progress (default 0.1)\n"
            "  --gso             udp: send each window as UDP GSO trains (one\n"
            "                    sendmsg per up to 64 datagrams)\n"
            "  --gro             udp: set UDP_GRO, so trains the server sent with GSO\n"
            "                    arrive as one buffer\n");
    exit(1);
}

static void parse_args(int argc, char **argv) {
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"unix", required_argument, 0, 'u'},
        {"conns", required_argument, 0, 'c'},
        {"depth", required_argument, 0, 'd'},
        {"size", required_argument, 0, 's'},
        {"write-size", required_argument, 0, 'w'},
        {"duration", required_argument, 0, 't'},
        {"warmup", required_argument, 0, 'W'},
        {"spin", no_argument, 0, 'S'},
        {"no-verify", no_argument, 0, 'V'},
        {"server-pid", required_argument, 0, 'P'},
        {"udp-timeout", required_argument, 0, 'T'},
        {"gso", no_argument, 0, 'G'},
        {"gro", no_argument, 0, 'R'},
        {"help", no_argument, 0, '?'},
        {0, 0, 0, 0},
    };
    if (argc < 2 || argv[1][0] == '-') usage();
    int found = 0;
    for (size_t i = 0; i < sizeof mode_names / sizeof mode_names[0]; i++) {
        if (strcmp(argv[1], mode_names[i]) == 0) {
            opt.mode = (enum mode)i;
            found = 1;
        }
    }
    if (!found) die("unknown mode %s", argv[1]);
    optind = 2;
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = (int)parse_ll(optarg, "port", 1, 65535, 10); break;
        case 'u': opt.unix_path = optarg; break;
        case 'c': opt.conns = (int)parse_ll(optarg, "conns", 1, 10000, 10); break;
        case 'd': opt.depth = (int)parse_ll(optarg, "depth", 1, 100000, 10); break;
        case 's': opt.size = (int)parse_ll(optarg, "size", 5, 16 << 20, 10); break;
        case 'w': opt.write_size = parse_ll(optarg, "write-size", 1, 1L << 30, 10); break;
        case 't': opt.duration = parse_double(optarg, "duration"); break;
        case 'W': opt.warmup = parse_double(optarg, "warmup"); break;
        case 'S': opt.spin = 1; break;
        case 'V': opt.verify = 0; break;
        case 'P': opt.server_pid = (int)parse_ll(optarg, "server-pid", 1, 1 << 30, 10); break;
        case 'T': opt.udp_timeout = parse_double(optarg, "udp-timeout"); break;
        case 'G': opt.gso = 1; break;
        case 'R': opt.gro = 1; break;
        default: usage();
        }
    }
    if (optind != argc) usage();
    if (opt.duration <= 0) die("duration must be > 0");
    int def_conns[] = {1, 32, 32, 1, 8};
    int def_depth[] = {1, 16, 16, 1, 32};
    if (opt.conns < 0) opt.conns = def_conns[opt.mode];
    if (opt.depth < 0) opt.depth = def_depth[opt.mode];
    if (opt.mode == M_PINGPONG && opt.depth != 1) die("pingpong has one message in flight");
    if (opt.mode == M_UDP && opt.size > 65507) die("udp size must be <= 65507");
    if (opt.mode == M_UDP && opt.unix_path) die("--unix is for TCP modes");
    if ((opt.gso || opt.gro) && opt.mode != M_UDP) die("--gso/--gro are for udp");
}

/* ---------------------------------------------------------------- sockets */
struct conn {
    int fd;
    int want_out;     /* EPOLLOUT registered */
    uint64_t sent;    /* bytes written */
    uint64_t target;  /* bytes that should have been written */
    uint64_t recvd;   /* bytes read */
    uint64_t *stamps; /* send time of each message in flight (ring, depth) */
    uint64_t head;    /* messages completed (ring read index) */
    uint64_t tail;    /* messages queued (ring write index) */
    int inflight;     /* udp */
    uint64_t sent_at; /* udp: when the last window was sent (latency at depth 1) */
    uint64_t last_progress;
};

static struct conn *conns;
static int epfd = -1;
static unsigned char *tmpl;  /* (depth + 1) framed messages back to back */
static size_t tmpl_len;
static unsigned char *rbuf;
static size_t rbuf_len;
static struct hist hist; /* latencies of the measured interval */
static int measuring;

/* counters; snapshotted when the measured interval starts and ends */
static uint64_t n_units;   /* messages, round trips, datagrams */
static uint64_t n_bytes;   /* payload bytes moved (received, or written in bulk) */
static uint64_t n_losses;  /* udp datagrams given up on */
static uint64_t n_reads, n_writes, n_waits; /* syscalls, for diagnosis */

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl: %s", strerror(errno));
}

static int make_socket(int type) {
    int fd;
    if (opt.unix_path && type == SOCK_STREAM) {
        struct sockaddr_un sun = {.sun_family = AF_UNIX};
        size_t len = strlen(opt.unix_path);
        if (len >= sizeof sun.sun_path) die("unix path too long");
        memcpy(sun.sun_path, opt.unix_path, len);
        if (opt.unix_path[0] == '@') sun.sun_path[0] = '\0'; /* abstract */
        socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len +
                                     (opt.unix_path[0] == '@' ? 0 : 1));
        for (int attempt = 0;; attempt++) {
            fd = socket(AF_UNIX, SOCK_STREAM, 0);
            if (fd < 0) die("socket: %s", strerror(errno));
            if (connect(fd, (struct sockaddr *)&sun, alen) == 0) break;
            if (attempt >= 100) die("connect %s: %s", opt.unix_path, strerror(errno));
            close(fd);
            usleep(20000);
        }
        return fd;
    }
    struct sockaddr_storage ss;
    socklen_t alen;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, opt.host, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)opt.port);
        alen = sizeof *sin;
    } else if (inet_pton(AF_INET6, opt.host, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)opt.port);
        alen = sizeof *sin6;
    } else {
        die("host must be an IPv4 or IPv6 literal: %s", opt.host);
    }
    for (int attempt = 0;; attempt++) {
        fd = socket(ss.ss_family, type, 0);
        if (fd < 0) die("socket: %s", strerror(errno));
        if (connect(fd, (struct sockaddr *)&ss, alen) == 0) break;
        if (attempt >= 100) die("connect %s:%d: %s", opt.host, opt.port, strerror(errno));
        close(fd);
        usleep(20000);
    }
    if (type == SOCK_STREAM) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

static void ep_add(int idx, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, conns[idx].fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static void ep_mod(int idx, uint32_t events) {
    if (opt.spin) return;
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, conns[idx].fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

/* -------------------------------------------------- framed stream traffic */
static void build_template(int count) {
    tmpl_len = (size_t)opt.size * (size_t)count;
    tmpl = malloc(tmpl_len);
    if (!tmpl) die("out of memory");
    for (int m = 0; m < count; m++) {
        unsigned char *p = tmpl + (size_t)m * (size_t)opt.size;
        uint32_t len = htonl((uint32_t)(opt.size - 4));
        memcpy(p, &len, 4);
        for (int i = 4; i < opt.size; i++) p[i] = (unsigned char)(i * 31 + 7);
    }
}

/* Queue k more messages on a connection, stamping them with time t. */
static inline void queue_msgs(struct conn *c, int k, uint64_t t) {
    for (int i = 0; i < k; i++) c->stamps[(c->tail++) % (uint64_t)opt.depth] = t;
    c->target += (uint64_t)k * (uint64_t)opt.size;
}

static void stream_flush(int idx) {
    struct conn *c = &conns[idx];
    while (c->sent < c->target) {
        size_t off = (size_t)(c->sent % (uint64_t)opt.size);
        size_t len = (size_t)(c->target - c->sent);
        if (len > tmpl_len - off) len = tmpl_len - off;
        ssize_t n = send(c->fd, tmpl + off, len, MSG_NOSIGNAL);
        n_writes++;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            peer_fail("send: %s", strerror(errno));
        }
        c->sent += (uint64_t)n;
    }
    int need_out = c->sent < c->target;
    if (need_out != c->want_out) {
        c->want_out = need_out;
        ep_mod(idx, EPOLLIN | (need_out ? EPOLLOUT : 0));
    }
}

static void verify_chunk(const struct conn *c, const unsigned char *data, size_t n) {
    size_t pos = (size_t)(c->recvd % (uint64_t)opt.size);
    while (n > 0) {
        size_t k = n < tmpl_len - pos ? n : tmpl_len - pos;
        if (memcmp(data, tmpl + pos, k) != 0) {
            size_t i = 0;
            while (data[i] == tmpl[pos + i]) i++;
            peer_fail("echoed stream differs at byte %llu (message %llu, offset %zu)",
                      (unsigned long long)(c->recvd + i),
                      (unsigned long long)((c->recvd + i) / (uint64_t)opt.size),
                      (size_t)((c->recvd + i) % (uint64_t)opt.size));
        }
        data += k;
        n -= k;
        pos = 0; /* tmpl_len is a multiple of size */
    }
}

static void stream_readable(int idx) {
    struct conn *c = &conns[idx];
    int got_any = 0;
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, rbuf_len, MSG_DONTWAIT);
        n_reads++;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            peer_fail("recv: %s", strerror(errno));
        }
        if (n == 0) peer_fail("server closed connection %d", idx);
        if (opt.verify) verify_chunk(c, rbuf, (size_t)n);
        uint64_t before = c->recvd / (uint64_t)opt.size;
        c->recvd += (uint64_t)n;
        uint64_t done = c->recvd / (uint64_t)opt.size - before;
        if (c->recvd > c->sent) peer_fail("received more bytes than were sent");
        got_any = 1;
        if (done) {
            uint64_t t = now_ns();
            for (uint64_t i = 0; i < done; i++) {
                uint64_t t0 = c->stamps[(c->head++) % (uint64_t)opt.depth];
                if (measuring) hist_add(&hist, t - t0, 1);
            }
            n_units += done;
            n_bytes += done * (uint64_t)opt.size;
            queue_msgs(c, (int)done, t);
        }
        if ((size_t)n < rbuf_len) break; /* drained; skip the EAGAIN syscall */
    }
    if (got_any) stream_flush(idx);
}

/* ------------------------------------------------------------------- bulk */
static void bulk_writable(int idx) {
    struct conn *c = &conns[idx];
    for (;;) {
        ssize_t n = send(c->fd, tmpl, tmpl_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            peer_fail("send: %s", strerror(errno));
        }
        n_bytes += (uint64_t)n;
        if ((size_t)n < tmpl_len) return;
    }
}

/* -------------------------------------------------------------------- udp */
#define UDP_BATCH 64
static struct mmsghdr umsgs[UDP_BATCH];
static struct iovec uiov[UDP_BATCH];

/* A window as GSO trains: one sendmsg carries up to 64 datagrams (and at
 * most 65507 bytes), which the kernel cuts into datagrams of opt.size. */
static int udp_send_gso(int fd, int k) {
    int per = 65507 / opt.size;
    if (per > 64) per = 64;
    if (per > k) per = k;
    for (int i = 0; i < per; i++) {
        uiov[i].iov_base = tmpl;
        uiov[i].iov_len = (size_t)opt.size;
    }
    union { char buf[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } ctl;
    struct msghdr mh = {.msg_iov = uiov, .msg_iovlen = (size_t)per};
    if (per > 1) {
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = IPPROTO_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t seg = (uint16_t)opt.size;
        memcpy(CMSG_DATA(cm), &seg, sizeof seg);
    }
    return sendmsg(fd, &mh, MSG_DONTWAIT) < 0 ? -1 : per;
}

static void udp_send(int idx, int k, uint64_t t) {
    struct conn *c = &conns[idx];
    while (k > 0) {
        int batch = k < UDP_BATCH ? k : UDP_BATCH;
        int n;
        if (opt.gso) {
            n = udp_send_gso(c->fd, batch);
        } else {
            for (int i = 0; i < batch; i++) {
                uiov[i].iov_base = tmpl;
                uiov[i].iov_len = (size_t)opt.size;
                memset(&umsgs[i].msg_hdr, 0, sizeof umsgs[i].msg_hdr);
                umsgs[i].msg_hdr.msg_iov = &uiov[i];
                umsgs[i].msg_hdr.msg_iovlen = 1;
            }
            n = sendmmsg(c->fd, umsgs, (unsigned)batch, MSG_DONTWAIT);
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNREFUSED ||
                errno == ENOBUFS)
                return; /* the timeout refills the window */
            if (errno == EINTR) continue;
            peer_fail("%s: %s", opt.gso ? "sendmsg(UDP_SEGMENT)" : "sendmmsg", strerror(errno));
        }
        c->inflight += n;
        k -= n;
        c->last_progress = t;
        c->sent_at = t;
        if (n < batch) return;
    }
}

static void udp_readable(int idx) {
    struct conn *c = &conns[idx];
    int got = 0;
    for (;;) {
        for (int i = 0; i < UDP_BATCH; i++) {
            uiov[i].iov_base = rbuf + (size_t)i * 65536;
            uiov[i].iov_len = 65536;
            memset(&umsgs[i].msg_hdr, 0, sizeof umsgs[i].msg_hdr);
            umsgs[i].msg_hdr.msg_iov = &uiov[i];
            umsgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(c->fd, umsgs, UDP_BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            if (errno == ECONNREFUSED) break; /* ICMP from a not-yet-bound server */
            peer_fail("recvmmsg: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            /* with --gro one message may hold a train of opt.size datagrams */
            unsigned len = umsgs[i].msg_len;
            if (len == 0 || len % (unsigned)opt.size != 0)
                peer_fail("bad echoed datagram (%u bytes)", len);
            for (unsigned off = 0; opt.verify && off < len; off += (unsigned)opt.size)
                if (memcmp((char *)uiov[i].iov_base + off, tmpl, (size_t)opt.size) != 0)
                    peer_fail("bad echoed datagram (%u bytes)", len);
            got += (int)(len / (unsigned)opt.size);
        }
        if (n < UDP_BATCH) break;
    }
    if (got == 0) return;
    n_units += (uint64_t)got;
    n_bytes += (uint64_t)got * (uint64_t)opt.size;
    c->inflight = c->inflight > got ? c->inflight - got : 0; /* late ones: 0 */
    uint64_t t = now_ns();
    if (opt.depth == 1 && got == 1 && measuring) hist_add(&hist, t - c->sent_at, 1);
    c->last_progress = t;
    udp_send(idx, opt.depth - c->inflight, t);
}

static void udp_check_timeouts(uint64_t t) {
    uint64_t limit = (uint64_t)(opt.udp_timeout * 1e9);
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        if (t - c->last_progress < limit) continue;
        n_losses += (uint64_t)c->inflight;
        c->inflight = 0;
        c->last_progress = t;
        udp_send(i, opt.depth, t);
    }
}

/* ------------------------------------------------------------------- main */
static volatile sig_atomic_t interrupted;
static void on_signal(int sig) {
    (void)sig;
    interrupted = 1;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    conns = calloc((size_t)opt.conns, sizeof *conns);
    if (!conns) die("out of memory");
    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1: %s", strerror(errno));

    if (opt.mode == M_BULK) {
        tmpl_len = (size_t)opt.write_size;
        tmpl = malloc(tmpl_len);
        if (!tmpl) die("out of memory");
        memset(tmpl, 0x5a, tmpl_len);
        rbuf_len = 4096;
    } else {
        build_template(opt.depth + 1);
        rbuf_len = opt.mode == M_UDP ? (size_t)UDP_BATCH * 65536 : 256 * 1024;
    }
    rbuf = malloc(rbuf_len);
    if (!rbuf) die("out of memory");

    uint64_t t_start = now_ns();
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        c->fd = make_socket(opt.mode == M_UDP ? SOCK_DGRAM : SOCK_STREAM);
        int one = 1;
        if (opt.gro && setsockopt(c->fd, IPPROTO_UDP, UDP_GRO, &one, sizeof one) < 0)
            die("setsockopt(UDP_GRO): %s", strerror(errno));
        set_nonblock(c->fd);
        c->stamps = calloc((size_t)opt.depth, sizeof *c->stamps);
        if (!c->stamps) die("out of memory");
        c->last_progress = t_start;
        if (!opt.spin) ep_add(i, opt.mode == M_BULK ? EPOLLOUT : EPOLLIN);
    }
    /* prime the pumps */
    t_start = now_ns();
    for (int i = 0; i < opt.conns; i++) {
        if (opt.mode == M_UDP) {
            udp_send(i, opt.depth, t_start);
        } else if (opt.mode != M_BULK) {
            queue_msgs(&conns[i], opt.depth, t_start);
            stream_flush(i);
        }
    }

    struct window win;
    window_init(&win, t_start, opt.warmup, opt.duration, opt.server_pid);
    uint64_t units0 = 0, bytes0 = 0, losses0 = 0;
    struct epoll_event events[256];

    for (;;) {
        int nev;
        if (opt.spin) {
            nev = opt.conns; /* try every socket */
        } else {
            nev = epoll_wait(epfd, events, 256, 10);
            n_waits++;
            if (nev < 0) {
                if (errno == EINTR) nev = 0;
                else die("epoll_wait: %s", strerror(errno));
            }
        }
        for (int e = 0; e < nev; e++) {
            int idx = opt.spin ? e : (int)events[e].data.u32;
            uint32_t ev = opt.spin ? (EPOLLIN | EPOLLOUT) : events[e].events;
            switch (opt.mode) {
            case M_PINGPONG:
            case M_PIPELINE:
            case M_RAW:
                if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) stream_readable(idx);
                if ((ev & EPOLLOUT) && conns[idx].sent < conns[idx].target) stream_flush(idx);
                break;
            case M_BULK:
                if (ev & (EPOLLHUP | EPOLLERR)) peer_fail("connection %d failed", idx);
                bulk_writable(idx);
                break;
            case M_UDP:
                udp_readable(idx);
                break;
            }
        }
        uint64_t t = now_ns();
        if (opt.mode == M_UDP) udp_check_timeouts(t);
        int w = window_tick(&win, &measuring, t, interrupted);
        if (w & WIN_START) {
            units0 = n_units;
            bytes0 = n_bytes;
            losses0 = n_losses;
            n_reads = n_writes = n_waits = 0;
        }
        if (w & WIN_END) break;
    }
    if (!measuring) peer_fail("interrupted during warm-up");

    double cpu, srv;
    double dt = window_finish(&win, &cpu, &srv);
    uint64_t units = n_units - units0;
    uint64_t bytes = n_bytes - bytes0;
    const char *unit = opt.mode == M_PINGPONG ? "rtt" : opt.mode == M_BULK ? "byte"
                     : opt.mode == M_UDP    ? "datagram" : "msg";
    if (opt.mode == M_BULK) units = bytes;

    printf("{\"mode\": \"%s\", \"conns\": %d, \"depth\": %d, \"size\": %d, "
           "\"write_size\": %ld, \"spin\": %s, \"duration_s\": %.6f, "
           "\"unit\": \"%s\", \"count\": %llu, \"rate\": %.1f, "
           "\"bytes\": %llu, \"gbit_per_s\": %.4f, ",
           mode_names[opt.mode], opt.conns, opt.depth, opt.size,
           opt.mode == M_BULK ? opt.write_size : 0L, opt.spin ? "true" : "false", dt,
           unit, (unsigned long long)units, (double)units / dt,
           (unsigned long long)bytes, (double)bytes * 8.0 / dt / 1e9);
    if (opt.mode != M_BULK && (opt.mode != M_UDP || opt.depth == 1)) json_latency(&hist);
    if (opt.mode == M_UDP) printf("\"losses\": %llu, ", (unsigned long long)(n_losses - losses0));
    json_tail(n_reads, n_writes, n_waits, cpu, srv, dt, interrupted);
    return 0;
}
