/*
 * bench_client.c - the libtirpc reference client of the rpc2 benchmark.
 *
 * A sequential clnt_call() loop (one call in flight, the only way a
 * libtirpc CLIENT works) on one TCP connection to 127.0.0.1:PORT, made with
 * clnttcp_create() and a fixed port (no rpcbind). XDR routines from rpcgen
 * (bench.x).
 *
 * usage: bench_client --port P [--proc 0|1] [--size N] [--duration S] [--warmup S]
 * Prints one JSON line: calls/s over the measured interval, latency
 * percentiles and the client's CPU per wall-clock second.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

#define BENCH_NAME "bench_client"
#include "bench_common.h" /* benchmarks/c */

/* xdr_void is declared without parameters: cast through void (*)(void) */
#define XDR_VOID ((xdrproc_t)(void (*)(void))xdr_void)

static const char *arg(int argc, char **argv, const char *name, const char *def) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    return def;
}

/* latency samples of the measured interval, microseconds (grows as needed) */
static double *lat;
static size_t lat_n, lat_cap;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double p) {
    if (lat_n == 0) return 0;
    size_t i = (size_t)(p / 100.0 * (double)lat_n);
    return lat[i >= lat_n ? lat_n - 1 : i];
}

int main(int argc, char **argv) {
    struct sockaddr_in a;
    struct timeval tv = {10, 0};
    int sock = RPC_ANYSOCK;
    int port = atoi(arg(argc, argv, "--port", "0"));
    int proc = atoi(arg(argc, argv, "--proc", "0"));
    u_int size = (u_int)atoi(arg(argc, argv, "--size", "4096"));
    double duration = atof(arg(argc, argv, "--duration", "3"));
    double warmup = atof(arg(argc, argv, "--warmup", "1"));
    if (port <= 0 || (proc != 0 && proc != 1) || duration <= 0) {
        fprintf(stderr, "usage: bench_client --port P [--proc 0|1] [--size N] "
                        "[--duration S] [--warmup S]\n");
        return 1;
    }
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CLIENT *c = clnttcp_create(&a, BENCH_PROG, BENCH_VERS, &sock, 0, 0);
    if (c == NULL) {
        clnt_pcreateerror("bench_client");
        return 1;
    }

    uint64_t t_start = now_ns();
    uint64_t t_measure = t_start + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(duration * 1e9);
    uint64_t t0 = 0, t = t_start, count = 0;
    double cpu0 = 0;
    int measuring = 0;
    for (;;) {
        enum clnt_stat st;
        bench_data res;
        uint64_t before = t;
        if (proc == 0) {
            st = clnt_call(c, BENCH_NULL, XDR_VOID, NULL, XDR_VOID,
                           NULL, tv);
        } else {
            memset(&res, 0, sizeof res);
            st = clnt_call(c, BENCH_GET4K, (xdrproc_t)xdr_u_int, (caddr_t)&size,
                           (xdrproc_t)xdr_bench_data, (caddr_t)&res, tv);
            if (st == RPC_SUCCESS && res.bench_data_len != size) {
                printf("{\"error\": \"GET4K returned %u bytes\"}\n", res.bench_data_len);
                return 2;
            }
            if (st == RPC_SUCCESS) clnt_freeres(c, (xdrproc_t)xdr_bench_data, (caddr_t)&res);
        }
        if (st != RPC_SUCCESS) {
            printf("{\"error\": \"clnt_call: %s\"}\n", clnt_sperrno(st));
            return 2;
        }
        t = now_ns();
        if (measuring) {
            count++;
            if (lat_n == lat_cap) {
                lat_cap = lat_cap ? lat_cap * 2 : 65536;
                lat = realloc(lat, lat_cap * sizeof *lat);
                if (!lat) return 1;
            }
            lat[lat_n++] = (double)(t - before) / 1000.0;
            if (t >= t_end) break;
        } else if (t >= t_measure) {
            measuring = 1;
            t0 = t;
            cpu0 = self_cpu_s();
        }
    }
    double dt = (double)(t - t0) / 1e9;
    double cpu = self_cpu_s() - cpu0;
    qsort(lat, lat_n, sizeof *lat, cmp_double);
    printf("{\"client\": \"libtirpc\", \"proc\": %d, \"depth\": 1, \"duration_s\": %.6f, "
           "\"count\": %llu, \"rate\": %.1f, \"lat_p50_us\": %.2f, \"lat_p99_us\": %.2f, "
           "\"client_cpu\": %.4f}\n",
           proc, dt, (unsigned long long)count, (double)count / dt, pct(50), pct(99),
           cpu / dt);
    clnt_destroy(c);
    free(lat);
    return 0;
}
