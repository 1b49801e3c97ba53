/* udp_limit: how fast C moves bulk data over UDP on loopback, as a ceiling for
 * drpc's large messages (benchmarks/drpc_bench.py --loads large).
 *
 * A receiver (pinned to core 0) and a sender (core 1), one UDP socket each,
 * over 127.0.0.1. The sender keeps the receiver busy but not flooded: it
 * sends a window of WINDOW bytes, then waits for the receiver's 1-byte
 * acknowledgement of each CHUNK bytes received (like drpc's credits, without
 * the per-packet requests); the receiver counts the bytes it read in the
 * measured time and, with "copy", copies each datagram's payload into one
 * 8 MiB message buffer, as drpc's reassembly does.
 *
 *   udp_limit SIZE SECONDS [copy] [gso]
 *
 * SIZE: datagram payload bytes (1472 or 65507). "gso": the sender hands the
 * kernel 64 KB of SIZE-byte segments per send (UDP_SEGMENT) and the receiver
 * asks for them coalesced (UDP_GRO), as evpl's udp backend does.
 * Prints one line: Gbit/s received, datagrams (or GRO trains) per second. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_common.h"

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

#define WINDOW (1u << 20)       /* bytes in flight (1 MiB: 2 MiB ran at half the rate) */
#define CHUNK (64u << 10)       /* acknowledged every CHUNK bytes */
#define MSG (8u << 20)          /* the reassembly buffer */


static int udp_socket(struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int big = 8 << 20;
    socklen_t n = sizeof(*addr);
    if (fd < 0) { perror("socket"); exit(1); }
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big));
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof(big));
    memset(addr, 0, sizeof(*addr));
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)addr, sizeof(*addr)) < 0) { perror("bind"); exit(1); }
    getsockname(fd, (struct sockaddr *)addr, &n);
    return fd;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: udp_limit SIZE SECONDS [copy] [gso]\n");
        return 2;
    }
    size_t size = (size_t)atol(argv[1]);
    double secs = atof(argv[2]);
    int copy = 0, gso = 0;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "copy")) copy = 1;
        if (!strcmp(argv[i], "gso")) gso = 1;
    }
    if (size < 1 || size > 65507) { fprintf(stderr, "SIZE must be 1..65507\n"); return 2; }
    struct sockaddr_in ra, sa;
    int rfd = udp_socket(&ra), sfd = udp_socket(&sa);
    int one = 1;
    if (gso) setsockopt(rfd, IPPROTO_UDP, UDP_GRO, &one, sizeof(one));
    int seg = (int)size;
    /* a send: one datagram, or with gso as many SIZE-byte segments as fit 64 KB */
    size_t per_send = gso ? (65507 / size) * size : size;
    if (gso) setsockopt(sfd, IPPROTO_UDP, UDP_SEGMENT, &seg, sizeof(seg));

    pid_t child = fork();
    if (child == 0) {                           /* the sender, core 1 */
        pin_cpu(1);
        char *buf = calloc(1, per_send);
        char ack[64];
        size_t inflight = 0;
        connect(sfd, (struct sockaddr *)&ra, sizeof(ra));
        for (;;) {
            while (inflight + per_send <= WINDOW) {
                if (send(sfd, buf, per_send, 0) < 0) {
                    if (errno == ECONNREFUSED) _exit(0);
                    perror("send");
                    _exit(1);
                }
                inflight += per_send;
            }
            ssize_t r = recv(sfd, ack, sizeof(ack), 0);
            if (r <= 0 || ack[0] == 'q') _exit(0);
            inflight = inflight > CHUNK ? inflight - CHUNK : 0;
        }
    }
    pin_cpu(0);                                     /* the receiver, core 0 */
    char *msg = malloc(MSG), *slot = malloc(65536);
    memset(msg, 0, MSG);
    size_t off = 0, since_ack = 0, bytes = 0, reads = 0;
    struct timeval tv = {1, 0};
    setsockopt(rfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    double t0 = now_s(), start = t0 + 0.3, end = start + secs, t;
    while ((t = now_s()) < end) {
        ssize_t n = recvfrom(rfd, slot, 65536, 0, NULL, NULL);
        if (n < 0) { perror("recv"); break; }
        if (copy) {                              /* into the 8 MiB message, as drpc does */
            if (off + (size_t)n > MSG) off = 0;
            memcpy(msg + off, slot, (size_t)n);
            off += (size_t)n;
        }
        if (t >= start) { bytes += (size_t)n; reads++; }
        since_ack += (size_t)n;
        while (since_ack >= CHUNK) {
            since_ack -= CHUNK;
            sendto(rfd, "a", 1, 0, (struct sockaddr *)&sa, sizeof(sa));
        }
    }
    sendto(rfd, "q", 1, 0, (struct sockaddr *)&sa, sizeof(sa));
    close(rfd);
    waitpid(child, NULL, 0);
    printf("size %zu%s%s: %.2f Gbit/s, %.0f reads/s\n", size, copy ? " copy" : "",
           gso ? " gso/gro" : "", bytes * 8 / secs / 1e9, reads / secs);
    return 0;
}
