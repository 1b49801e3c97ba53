/* The kernel's floor for a busy-polling ping-pong between two cores.
 *
 * Two processes (parent on core 0, child on core 1) bounce a 64-byte message
 * over one connection (tcp on 127.0.0.1 with TCP_NODELAY, or a unix stream
 * socket pair), each spinning on a zero-timeout epoll_wait, then one recv
 * and one send per message: the system calls a polling event loop needs per
 * message and nothing else (no framing, no protocol). No ZeroMQ stack can
 * make more round trips per second over the same kernel path, so it tells
 * how close a poll-mode REQ/REP gets to what the machine allows.
 *
 * udp: two connected UDP sockets on 127.0.0.1, the same epoll spin, one
 * recv and one send per datagram. The -direct modes (tcp-direct,
 * unix-direct, udp-direct): no epoll, the spin is the recv itself
 * (MSG_DONTWAIT until data is there): what a loop that reads its hot socket
 * directly while polling pays.
 *
 * usage: pingpong_floor tcp|unix|udp[-direct] [seconds]
 * prints one JSON line: {"msgs": round_trips, "secs": elapsed, "cpu": 0}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_common.h"


static int tcp_pair(int sv[2]) {
    struct sockaddr_in a = {0};
    socklen_t n = sizeof a;
    int one = 1, l = socket(AF_INET, SOCK_STREAM, 0);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) ||
        getsockname(l, (struct sockaddr *)&a, &n))
        return -1;
    sv[0] = socket(AF_INET, SOCK_STREAM, 0);
    if (sv[0] < 0 || connect(sv[0], (struct sockaddr *)&a, sizeof a))
        return -1;
    sv[1] = accept(l, NULL, NULL);
    close(l);
    if (sv[1] < 0)
        return -1;
    setsockopt(sv[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(sv[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return 0;
}

/* Two UDP sockets on 127.0.0.1, each connected to the other. */
static int udp_pair(int sv[2]) {
    struct sockaddr_in a[2];
    for (int i = 0; i < 2; i++) {
        socklen_t n = sizeof a[i];
        memset(&a[i], 0, sizeof a[i]);
        a[i].sin_family = AF_INET;
        a[i].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        sv[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (sv[i] < 0 || bind(sv[i], (struct sockaddr *)&a[i], sizeof a[i]) ||
            getsockname(sv[i], (struct sockaddr *)&a[i], &n))
            return -1;
    }
    if (connect(sv[0], (struct sockaddr *)&a[1], sizeof a[1]) ||
        connect(sv[1], (struct sockaddr *)&a[0], sizeof a[0]))
        return -1;
    return 0;
}

int main(int argc, char **argv) {
    int sv[2];
    char buf[64] = {0};
    double duration = argc > 2 ? atof(argv[2]) : 2.0;
    char kind[16] = "";
    const char *dash = strchr(argc > 1 ? argv[1] : "", '-');
    int direct = dash && strcmp(dash, "-direct") == 0;
    snprintf(kind, sizeof kind, "%.*s", dash ? (int)(dash - argv[1]) : 15, argc > 1 ? argv[1] : "");
    int udp = strcmp(kind, "udp") == 0;
    if ((dash && !direct) || (strcmp(kind, "tcp") && strcmp(kind, "unix") && !udp)) {
        fprintf(stderr, "usage: %s tcp|unix|udp[-direct] [seconds]\n", argv[0]);
        return 2;
    }
    if (strcmp(kind, "unix") == 0 ? socketpair(AF_UNIX, SOCK_STREAM, 0, sv)
        : udp ? udp_pair(sv) : tcp_pair(sv)) {
        perror("socket pair");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    int fd = child ? sv[0] : sv[1];
    pin_cpu(child ? 0 : 1);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    long n = 0;
    double t0 = now_s(), t_end = t0 + duration;
    if (child && send(fd, buf, sizeof buf, 0) != sizeof buf)
        return 1;
    for (;;) {
        struct epoll_event got[4];
        size_t have = 0;
        while (have < sizeof buf) {          /* a whole message, spinning */
            while (!direct && epoll_wait(ep, got, 4, 0) == 0)
                ;
            ssize_t r = recv(fd, buf + have, sizeof buf - have, MSG_DONTWAIT);
            if (r == 0 || (r < 0 && errno != EAGAIN))
                goto out;
            if (r > 0)
                have += (size_t)r;
        }
        n++;
        if (child && (n & 1023) == 0 && now_s() >= t_end)
            break;
        if (send(fd, buf, sizeof buf, 0) != sizeof buf)
            break;
    }
out:
    if (child) {
        double secs = now_s() - t0;
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        printf("{\"msgs\": %ld, \"secs\": %.6f, \"cpu\": 0}\n", n, secs);
    }
    return 0;
}
