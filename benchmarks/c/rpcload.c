/*
 * rpcload.c - ONC RPC (RFC 5531) load generator for the rpc2 benchmark.
 *
 * C TCP connections (--conns, default 1) to an RPC server, each with D calls
 * in flight (--depth, default 64). Every call is a hand-encoded record
 * (record marking, one fragment): AUTH_NONE credentials and verifier,
 * procedure --proc of program --prog version --vers; procedure 1 carries one
 * unsigned argument (--size, default 4096: BENCH_GET4K asks for that many
 * bytes). As soon as a reply arrives its slot sends the next call, so the
 * depth stays constant.
 *
 * Replies are parsed as a stream (any fragmentation, any read boundaries)
 * and each one is checked: its xid must be a call in flight on that
 * connection (replies may come in any order), it must be MSG_ACCEPTED /
 * SUCCESS with an empty AUTH_NONE verifier, and its size must be that of
 * the procedure's result (void for 0; an opaque of --size bytes for 1).
 * Anything else fails the run.
 *
 * The loop is epoll, level triggered. Latency per call is send-to-reply
 * (the send stamp is taken when the call is queued), in a log-linear
 * histogram (< 1 % bucket error). With --server-pid the server's
 * utime+stime is read from /proc over exactly the measured interval.
 *
 * Output: one JSON line on stdout (like loadgen). Exit status 0 on success,
 * 1 on usage or setup error, 2 when the server misbehaved.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BENCH_NAME "rpcload"
#include "bench_common.h"

#define MAX_DEPTH 65536 /* the slot is the low 16 bits of the xid */

static struct {
    const char *host;
    int port;
    int conns;
    int depth;
    uint32_t prog;
    uint32_t vers;
    uint32_t proc;
    uint32_t size;
    double duration;
    double warmup;
    int server_pid;
} opt = {
    .host = "127.0.0.1",
    .port = 0,
    .conns = 1,
    .depth = 64,
    .prog = 0x20000099,
    .vers = 1,
    .proc = 0,
    .size = 4096,
    .duration = 3.0,
    .warmup = 1.0,
};

/* Report a misbehaving server as a JSON error line and exit with status 2. */
static void peer_fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void peer_fail(const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "rpcload: %s\n", msg);
    printf("{\"mode\": \"rpc\", \"error\": \"%s\"}\n", msg);
    fflush(stdout);
    exit(2);
}

static void usage(void) {
    fprintf(stderr,
            "usage: rpcload --port P [options]\n"
            "  --host H          server IPv4 address (default 127.0.0.1)\n"
            "  --port P          server TCP port\n"
            "  --conns N         connections (default 1)\n"
            "  --depth D         calls in flight per connection (default 64)\n"
            "  --proc N          procedure: 0 (NULL, void) or 1 (GET4K: unsigned -> opaque)\n"
            "  --size S          procedure 1's argument: reply opaque size (default 4096)\n"
            "  --prog P --vers V program and version (default 0x20000099, 1)\n"
            "  --duration SEC    measured interval (default 3)\n"
            "  --warmup SEC      unmeasured warm-up before it (default 1)\n"
            "  --server-pid PID  report that process's CPU time over the interval\n");
    exit(1);
}

static void parse_args(int argc, char **argv) {
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"conns", required_argument, 0, 'c'},
        {"depth", required_argument, 0, 'd'},
        {"proc", required_argument, 0, 'r'},
        {"size", required_argument, 0, 's'},
        {"prog", required_argument, 0, 'g'},
        {"vers", required_argument, 0, 'v'},
        {"duration", required_argument, 0, 't'},
        {"warmup", required_argument, 0, 'W'},
        {"server-pid", required_argument, 0, 'P'},
        {"help", no_argument, 0, '?'},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = (int)parse_ll(optarg, "port", 1, 65535, 0); break;
        case 'c': opt.conns = (int)parse_ll(optarg, "conns", 1, 10000, 0); break;
        case 'd': opt.depth = (int)parse_ll(optarg, "depth", 1, MAX_DEPTH, 0); break;
        case 'r': opt.proc = (uint32_t)parse_ll(optarg, "proc", 0, 1, 0); break;
        case 's': opt.size = (uint32_t)parse_ll(optarg, "size", 0, 1 << 24, 0); break;
        case 'g': opt.prog = (uint32_t)parse_ll(optarg, "prog", 0, 0xFFFFFFFFll, 0); break;
        case 'v': opt.vers = (uint32_t)parse_ll(optarg, "vers", 0, 0xFFFFFFFFll, 0); break;
        case 't': opt.duration = parse_double(optarg, "duration"); break;
        case 'W': opt.warmup = parse_double(optarg, "warmup"); break;
        case 'P': opt.server_pid = (int)parse_ll(optarg, "server-pid", 1, 1 << 30, 0); break;
        default: usage();
        }
    }
    if (optind != argc || opt.port == 0) usage();
    if (opt.duration <= 0) die("duration must be > 0");
}

/* ----------------------------------------------------------- connections */
#define HDR_KEEP 28 /* reply bytes checked: xid .. accept_stat + opaque length */

struct conn {
    int fd;
    int want_out;
    unsigned char *out; /* calls not yet written */
    size_t out_off, out_len, out_cap;
    uint32_t *xid;      /* per slot: the xid in flight */
    uint64_t *stamp;    /* per slot: when it was queued */
    /* reply parser */
    unsigned char mark[4];
    int mark_have;      /* bytes of the record mark read so far */
    uint32_t frag_left; /* bytes left in the current fragment */
    int frag_last;      /* the current fragment ends the record */
    int in_frag;
    uint64_t rec_len;   /* bytes of the current record so far */
    unsigned char hdr[HDR_KEEP];
};

static struct conn *conns;
static int epfd = -1;
static unsigned char call_tmpl[48];
static size_t call_len;
static uint64_t reply_len; /* expected record length */
static unsigned char *rbuf;
static const size_t rbuf_len = 256 * 1024;
static struct hist hist; /* latencies of the measured interval */
static int measuring;
static uint64_t n_calls, n_bytes, n_reads, n_writes, n_waits;

static void put32(unsigned char *p, uint32_t v) {
    v = htonl(v);
    memcpy(p, &v, 4);
}

static uint32_t get32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

static void build_call(void) {
    unsigned char *p = call_tmpl + 4;
    put32(p + 0, 0);          /* xid, patched per call */
    put32(p + 4, 0);          /* CALL */
    put32(p + 8, 2);          /* RPC version */
    put32(p + 12, opt.prog);
    put32(p + 16, opt.vers);
    put32(p + 20, opt.proc);
    put32(p + 24, 0);         /* cred AUTH_NONE, length 0 */
    put32(p + 28, 0);
    put32(p + 32, 0);         /* verf AUTH_NONE, length 0 */
    put32(p + 36, 0);
    size_t body = 40;
    if (opt.proc == 1) {
        put32(p + 40, opt.size);
        body += 4;
    }
    put32(call_tmpl, 0x80000000u | (uint32_t)body); /* last fragment */
    call_len = 4 + body;
    /* xid, REPLY, MSG_ACCEPTED, verf (flavor, length 0), SUCCESS [, opaque] */
    reply_len = 24 + (opt.proc == 1 ? 4 + (((uint64_t)opt.size + 3) & ~3ull) : 0);
}

static void ep_ctl(int op, int idx, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(epfd, op, conns[idx].fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
}

static int connect_tcp(void) {
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &sin.sin_addr) != 1)
        die("host must be an IPv4 literal: %s", opt.host);
    int fd;
    for (int attempt = 0;; attempt++) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket: %s", strerror(errno));
        if (connect(fd, (struct sockaddr *)&sin, sizeof sin) == 0) break;
        if (attempt >= 100) die("connect %s:%d: %s", opt.host, opt.port, strerror(errno));
        close(fd);
        usleep(20000);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl: %s", strerror(errno));
    return fd;
}

/* Queue the next call of slot ``slot`` (a new xid: generation in the high bits). */
static inline void queue_call(struct conn *c, uint32_t slot, uint64_t t) {
    uint32_t xid = ((((c->xid[slot] >> 16) + 1) & 0xFFFF) << 16) | slot;
    c->xid[slot] = xid;
    c->stamp[slot] = t;
    if (c->out_off + c->out_len + call_len > c->out_cap) {
        memmove(c->out, c->out + c->out_off, c->out_len);
        c->out_off = 0;
    }
    unsigned char *p = c->out + c->out_off + c->out_len;
    memcpy(p, call_tmpl, call_len);
    put32(p + 4, xid);
    c->out_len += call_len;
}

static void flush(int idx) {
    struct conn *c = &conns[idx];
    while (c->out_len > 0) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len, MSG_NOSIGNAL);
        n_writes++;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            peer_fail("send: %s", strerror(errno));
        }
        c->out_off += (size_t)n;
        c->out_len -= (size_t)n;
    }
    if (c->out_len == 0) c->out_off = 0;
    int need_out = c->out_len > 0;
    if (need_out != c->want_out) {
        c->want_out = need_out;
        ep_ctl(EPOLL_CTL_MOD, idx, EPOLLIN | (need_out ? EPOLLOUT : 0));
    }
}

/* A whole reply record was read: check it and send the slot's next call. */
static void reply_done(int idx, struct conn *c, uint64_t t) {
    const unsigned char *h = c->hdr;
    if (c->rec_len < 24) peer_fail("conn %d: reply record of %llu bytes", idx,
                                   (unsigned long long)c->rec_len);
    uint32_t xid = get32(h), slot = xid & 0xFFFF;
    if (slot >= (uint32_t)opt.depth || c->xid[slot] != xid)
        peer_fail("conn %d: reply with unknown xid %#x", idx, xid);
    if (get32(h + 4) != 1) peer_fail("conn %d: xid %#x: not a REPLY", idx, xid);
    if (get32(h + 8) != 0) peer_fail("conn %d: xid %#x: MSG_DENIED", idx, xid);
    if (get32(h + 16) != 0) peer_fail("conn %d: xid %#x: verifier of %u bytes", idx, xid,
                                      get32(h + 16));
    if (get32(h + 20) != 0) peer_fail("conn %d: xid %#x: accept_stat %u", idx, xid,
                                      get32(h + 20));
    if (c->rec_len != reply_len)
        peer_fail("conn %d: xid %#x: reply of %llu bytes, expected %llu", idx, xid,
                  (unsigned long long)c->rec_len, (unsigned long long)reply_len);
    if (opt.proc == 1 && get32(h + 24) != opt.size)
        peer_fail("conn %d: xid %#x: opaque of %u bytes", idx, xid, get32(h + 24));
    if (measuring) hist_add(&hist, t - c->stamp[slot], 1);
    n_calls++;
    n_bytes += c->rec_len;
    queue_call(c, slot, t);
}

/* Feed received bytes to the record-marking parser of connection ``idx``. */
static void parse(int idx, const unsigned char *p, size_t n, uint64_t t) {
    struct conn *c = &conns[idx];
    while (n > 0) {
        if (!c->in_frag) {
            size_t k = 4 - (size_t)c->mark_have;
            if (k > n) k = n;
            memcpy(c->mark + c->mark_have, p, k);
            c->mark_have += (int)k;
            p += k;
            n -= k;
            if (c->mark_have < 4) return;
            uint32_t m = get32(c->mark);
            c->mark_have = 0;
            c->frag_last = (m & 0x80000000u) != 0;
            c->frag_left = m & 0x7FFFFFFFu;
            c->in_frag = 1;
            if (c->rec_len + c->frag_left > reply_len + 4096)
                peer_fail("conn %d: reply record of %llu+ bytes", idx,
                          (unsigned long long)(c->rec_len + c->frag_left));
        }
        size_t k = c->frag_left < n ? c->frag_left : n;
        if (c->rec_len < HDR_KEEP) {
            size_t keep = HDR_KEEP - (size_t)c->rec_len;
            memcpy(c->hdr + c->rec_len, p, keep < k ? keep : k);
        }
        c->rec_len += k;
        c->frag_left -= (uint32_t)k;
        p += k;
        n -= k;
        if (c->frag_left == 0) {
            c->in_frag = 0;
            if (c->frag_last) {
                reply_done(idx, c, t);
                c->rec_len = 0;
            }
        }
    }
}

static void readable(int idx) {
    struct conn *c = &conns[idx];
    int got = 0;
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, rbuf_len, MSG_DONTWAIT);
        n_reads++;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            peer_fail("recv: %s", strerror(errno));
        }
        if (n == 0) peer_fail("server closed connection %d", idx);
        parse(idx, rbuf, (size_t)n, now_ns());
        got = 1;
        if ((size_t)n < rbuf_len) break; /* drained; skip the EAGAIN syscall */
    }
    if (got) flush(idx);
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
    build_call();

    conns = calloc((size_t)opt.conns, sizeof *conns);
    rbuf = malloc(rbuf_len);
    if (!conns || !rbuf) die("out of memory");
    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1: %s", strerror(errno));
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        c->fd = connect_tcp();
        c->out_cap = (size_t)opt.depth * call_len * 2;
        c->out = malloc(c->out_cap);
        c->xid = calloc((size_t)opt.depth, sizeof *c->xid);
        c->stamp = calloc((size_t)opt.depth, sizeof *c->stamp);
        if (!c->out || !c->xid || !c->stamp) die("out of memory");
        for (int s = 0; s < opt.depth; s++) c->xid[s] = (uint32_t)s; /* generation 0 */
        ep_ctl(EPOLL_CTL_ADD, i, EPOLLIN);
    }
    uint64_t t_start = now_ns();
    for (int i = 0; i < opt.conns; i++) {
        for (int s = 0; s < opt.depth; s++) queue_call(&conns[i], (uint32_t)s, t_start);
        flush(i);
    }

    struct window win;
    window_init(&win, t_start, opt.warmup, opt.duration, opt.server_pid);
    uint64_t calls0 = 0, bytes0 = 0;
    struct epoll_event events[256];
    for (;;) {
        int nev = epoll_wait(epfd, events, 256, 10);
        n_waits++;
        if (nev < 0) {
            if (errno == EINTR) nev = 0;
            else die("epoll_wait: %s", strerror(errno));
        }
        for (int e = 0; e < nev; e++) {
            int idx = (int)events[e].data.u32;
            if (events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(idx);
            if ((events[e].events & EPOLLOUT) && conns[idx].out_len > 0) flush(idx);
        }
        uint64_t t = now_ns();
        int w = window_tick(&win, &measuring, t, interrupted);
        if (w & WIN_START) {
            calls0 = n_calls;
            bytes0 = n_bytes;
            n_reads = n_writes = n_waits = 0;
        }
        if (w & WIN_END) break;
    }
    if (!measuring) peer_fail("interrupted during warm-up");

    double cpu, srv;
    double dt = window_finish(&win, &cpu, &srv);
    uint64_t calls = n_calls - calls0;
    printf("{\"mode\": \"rpc\", \"prog\": %u, \"proc\": %u, \"size\": %u, \"conns\": %d, "
           "\"depth\": %d, \"duration_s\": %.6f, \"unit\": \"call\", \"count\": %llu, "
           "\"rate\": %.1f, \"reply_bytes\": %llu, ",
           opt.prog, opt.proc, opt.proc == 1 ? opt.size : 0, opt.conns, opt.depth, dt,
           (unsigned long long)calls, (double)calls / dt,
           (unsigned long long)(n_bytes - bytes0));
    json_latency(&hist);
    json_tail(n_reads, n_writes, n_waits, cpu, srv, dt, interrupted);
    return 0;
}
