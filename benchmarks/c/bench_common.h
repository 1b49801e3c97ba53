/*
 * bench_common.h - pieces shared by the benchmark C programs (loadgen.c,
 * rpcload.c, rpc/bench_client.c, udp_limit.c, pingpong_floor.c): error exit,
 * option parsing, clocks, CPU pinning, CPU
 * time (own and another process's, from /proc), a log-linear latency
 * histogram and the common tail of the JSON result line.
 *
 * Everything is static (inline), so a program pays only for what it uses.
 * Define BENCH_NAME (the program name for messages) before including.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifndef BENCH_NAME
#define BENCH_NAME "bench"
#endif

/* ------------------------------------------------------------ error exit */
static inline void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static inline void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, BENCH_NAME ": ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

/* ---------------------------------------------------------------- options */
static inline double parse_double(const char *s, const char *what) {
    char *end;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0' || v < 0) die("bad %s: %s", what, s);
    return v;
}

/* An integer in [min, max] in ``base`` (0: C notation, 0x.. accepted). */
static inline long long parse_ll(const char *s, const char *what, long long min,
                                 long long max, int base) {
    char *end;
    long long v = strtoll(s, &end, base);
    if (*s == '\0' || *end != '\0' || v < min || v > max) die("bad %s: %s", what, s);
    return v;
}

/* ------------------------------------------------------------------- time */
static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline double now_s(void) { return (double)now_ns() * 1e-9; }

#ifdef _GNU_SOURCE
#include <sched.h>
/* Pin this process to CPU ``core`` (define _GNU_SOURCE before any include). */
static inline void pin_cpu(int core) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(core, &set);
    sched_setaffinity(0, sizeof(set), &set);
}
#endif

static inline double self_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* utime + stime of a process in seconds, from /proc/PID/stat; -1 if gone. */
static inline double proc_cpu_s(int pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* comm may contain spaces */
    if (!p) return -1;
    unsigned long utime = 0, stime = 0;
    /* after ")": state(3) ppid pgrp session tty tpgid flags minflt cminflt
     * majflt cmajflt utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
               &utime, &stime) != 2)
        return -1;
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

/* CPU seconds ``pid`` used since it had used ``before`` (from proc_cpu_s);
 * -1 when there is no such process or either reading failed. */
static inline double proc_cpu_since(int pid, double before) {
    if (!pid) return -1;
    double now = proc_cpu_s(pid);
    return before >= 0 && now >= 0 ? now - before : -1;
}

/* -------------------------------------------- log-linear latency histogram */
#define SUB_BITS 7
#define SUB_COUNT (1 << SUB_BITS)
#define HIST_BUCKETS (64 * SUB_COUNT)

struct hist {
    uint64_t bucket[HIST_BUCKETS];
    uint64_t n;
    double sum;
};

static inline int hist_index(uint64_t v) {
    if (v < SUB_COUNT) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    return (shift + 1) * SUB_COUNT + (int)((v >> shift) & (SUB_COUNT - 1));
}

static inline uint64_t hist_value(int idx) { /* bucket midpoint */
    if (idx < SUB_COUNT) return (uint64_t)idx;
    int shift = idx / SUB_COUNT - 1;
    uint64_t base = ((uint64_t)SUB_COUNT + (uint64_t)(idx % SUB_COUNT)) << shift;
    return base + ((1ull << shift) >> 1);
}

/* Record ``count`` samples of ``v`` nanoseconds. */
static inline void hist_add(struct hist *h, uint64_t v, uint64_t count) {
    h->bucket[hist_index(v)] += count;
    h->n += count;
    h->sum += (double)v * (double)count;
}

static inline double hist_pct_us(const struct hist *h, double pct) {
    if (h->n == 0) return 0;
    uint64_t rank = (uint64_t)(pct / 100.0 * (double)h->n);
    if (rank >= h->n) rank = h->n - 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += h->bucket[i];
        if (seen > rank) return (double)hist_value(i) / 1000.0;
    }
    return 0;
}

/* ----------------------------------------------------------- JSON output */
/* The latency fields (nothing when the histogram is empty). */
static inline void json_latency(const struct hist *h) {
    if (h->n == 0) return;
    printf("\"lat_p50_us\": %.2f, \"lat_p99_us\": %.2f, \"lat_p999_us\": %.2f, "
           "\"lat_mean_us\": %.2f, ",
           hist_pct_us(h, 50), hist_pct_us(h, 99), hist_pct_us(h, 99.9),
           h->sum / (double)h->n / 1000.0);
}

/* The common end of the result line: syscalls, CPU and the closing brace.
 * ``srv`` is the server's CPU seconds over ``dt``, or < 0 when unknown. */
static inline void json_tail(uint64_t reads, uint64_t writes, uint64_t waits, double cpu,
                             double srv, double dt, int interrupted) {
    printf("\"syscalls\": {\"reads\": %llu, \"writes\": %llu, \"waits\": %llu}, ",
           (unsigned long long)reads, (unsigned long long)writes,
           (unsigned long long)waits);
    printf("\"client_cpu\": %.4f, ", cpu / dt);
    if (srv >= 0) printf("\"server_cpu_s\": %.4f, \"server_cpu\": %.4f, ", srv, srv / dt);
    printf("\"interrupted\": %s}\n", interrupted ? "true" : "false");
    fflush(stdout);
}

/* The measured interval: `warmup` seconds after `start`, then `duration`
 * seconds, with the client's (and, given its pid, the server's) CPU time
 * over exactly that interval. */
struct window {
    uint64_t t_measure, t_end, t0, t1;
    double cpu0, srv0;
    int server_pid;
};

enum { WIN_START = 1, WIN_END = 2 };

static inline void window_init(struct window *w, uint64_t start, double warmup,
                               double duration, int server_pid) {
    memset(w, 0, sizeof(*w));
    w->t_measure = start + (uint64_t)(warmup * 1e9);
    w->t_end = w->t_measure + (uint64_t)(duration * 1e9);
    w->server_pid = server_pid;
}

/* Call once per round of events at time `t`. WIN_START: the interval begins
 * now (snapshot the counters); WIN_END: stop (also when interrupted). */
static inline int window_tick(struct window *w, int *measuring, uint64_t t, int interrupted) {
    int r = 0;
    if (!*measuring && t >= w->t_measure) {
        *measuring = 1;
        w->t0 = t;
        w->cpu0 = self_cpu_s();
        if (w->server_pid) w->srv0 = proc_cpu_s(w->server_pid);
        r |= WIN_START;
    }
    if ((*measuring && t >= w->t_end) || interrupted) {
        w->t1 = t;
        r |= WIN_END;
    }
    return r;
}

/* After the run: the seconds measured, and the CPU seconds spent in them by
 * this process (`cpu`) and the server (`srv`, < 0 when unknown). */
static inline double window_finish(const struct window *w, double *cpu, double *srv) {
    *cpu = self_cpu_s() - w->cpu0;
    *srv = proc_cpu_since(w->server_pid, w->srv0);
    return (double)(w->t1 - w->t0) / 1e9;
}

#endif /* BENCH_COMMON_H */
