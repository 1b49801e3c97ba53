/*
 * zmq_perf.c - the libzmq C reference for benchmarks/zmtp_bench.py: one
 * socket, one role, written the way libzmq's own perf tools are (a blocking
 * loop over zmq_send/zmq_recv of reused buffers).
 *
 *   zmq_perf ROLE ENDPOINT SIZE [WARMUP_S DURATION_S]
 *
 * Roles that bind print "ready ENDPOINT" (the endpoint as bound) and those
 * that measure (pull, sub, req) print one JSON line:
 *   {"msgs": N, "secs": T, "cpu": CPU_SECONDS_OF_THIS_PROCESS}
 * counted from WARMUP_S after their first message for DURATION_S.
 * push, pub and rep run until killed.
 *
 *   pull  binds, counts          push  connects, sends forever
 *   pub   binds, sends forever   sub   connects (subscribes to all), counts
 *   rep   binds, echoes          req   connects, counts round trips
 */
#define BENCH_NAME "zmq_perf"
#include "bench_common.h"

#include <zmq.h>

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec
         + ru.ru_stime.tv_usec * 1e-6;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 4)
        die("usage: zmq_perf push|pull|pub|sub|req|rep ENDPOINT SIZE [WARMUP DURATION]");
    const char *role = argv[1], *ep = argv[2];
    size_t size = (size_t)atol(argv[3]);
    double warmup = argc > 4 ? atof(argv[4]) : 0.5, duration = argc > 5 ? atof(argv[5]) : 2.0;
    char *buf = calloc(1, size ? size : 1);
    if (!buf)
        die("out of memory");
    void *ctx = zmq_ctx_new();
    int type = !strcmp(role, "push") ? ZMQ_PUSH : !strcmp(role, "pull") ? ZMQ_PULL
             : !strcmp(role, "pub") ? ZMQ_PUB : !strcmp(role, "sub") ? ZMQ_SUB
             : !strcmp(role, "req") ? ZMQ_REQ : !strcmp(role, "rep") ? ZMQ_REP : -1;
    if (type < 0)
        die("unknown role %s", role);
    void *s = zmq_socket(ctx, type);
    int binds = type == ZMQ_PULL || type == ZMQ_PUB || type == ZMQ_REP;
    if (binds) {
        if (zmq_bind(s, ep) != 0)
            die("bind %s: %s", ep, zmq_strerror(errno));
        char real[256];
        size_t len = sizeof real;
        zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, real, &len);
        printf("ready %s\n", real);
        fflush(stdout);
    } else {
        if (type == ZMQ_SUB)
            zmq_setsockopt(s, ZMQ_SUBSCRIBE, "", 0);
        if (zmq_connect(s, ep) != 0)
            die("connect %s: %s", ep, zmq_strerror(errno));
    }
    if (type == ZMQ_PUSH || type == ZMQ_PUB) {
        for (;;)
            if (zmq_send(s, buf, size, 0) < 0 && errno != EINTR)
                die("send: %s", zmq_strerror(errno));
    }
    if (type == ZMQ_REP) {
        for (;;) {
            int n = zmq_recv(s, buf, size, 0);
            if (n < 0 || zmq_send(s, buf, (size_t)n, 0) < 0)
                die("rep: %s", zmq_strerror(errno));
        }
    }
    /* measuring roles: pull, sub, req */
    long long count = 0;
    double start = 0, end = 0, t, cpu0 = 0;
    int counting = 0;
    for (;;) {
        if (type == ZMQ_REQ && zmq_send(s, buf, size, 0) < 0)
            die("send: %s", zmq_strerror(errno));
        if (zmq_recv(s, buf, size, 0) < 0)
            die("recv: %s", zmq_strerror(errno));
        if (!start) {
            start = now_s() + warmup;
            end = start + duration;
        }
        if (counting) {
            count++;
            if ((count & 255) == 0 && (t = now_s()) >= end)
                break;
        } else if ((count++ & 255) == 0 && now_s() >= start) {
            counting = 1;
            count = 0;
            cpu0 = cpu_s();
            start = now_s();
            end = start + duration;
        }
    }
    printf("{\"msgs\": %lld, \"secs\": %.6f, \"cpu\": %.6f}\n", count, now_s() - start,
           cpu_s() - cpu0);
    fflush(stdout);
    _exit(0);   /* do not linger on the context */
}
