# cython: language_level=3
"""Declarations of the Linux system interfaces the engine uses."""

from libc.stdint cimport int64_t, uint64_t, uint32_t, uint16_t
from posix.uio cimport iovec
from posix.time cimport timespec

cdef extern from "evpl_helpers.h" nogil:
    int evpl_xchg(int* p, int v)
    int evpl_load(int* p)
    void evpl_store(int* p, int v)
    int64_t evpl_now_ns()
    uint64_t evpl_load_uint(const unsigned char* p, int size, int big)
    void evpl_store_uint(unsigned char* p, int size, int big, uint64_t v)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL
    uint32_t EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP, EPOLLET, EPOLLPRI

cdef extern from "evpl_helpers.h" nogil:
    int evpl_epoll_wait_ns(int epfd, epoll_event* ev, int max, int64_t timeout_ns)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK, EFD_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    int recvmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags, timespec* tmo)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags)
    int accept4(int fd, sockaddr* addr, socklen_t* len, int flags)
    int getsockopt(int fd, int level, int name, void* val, socklen_t* len)
    int setsockopt(int fd, int level, int name, const void* val, socklen_t len)
    int getsockname(int fd, sockaddr* addr, socklen_t* len)
    int getpeername(int fd, sockaddr* addr, socklen_t* len)
    int shutdown(int fd, int how)
    int SOL_SOCKET, SO_ERROR, MSG_NOSIGNAL, MSG_DONTWAIT, MSG_TRUNC
    int SOCK_NONBLOCK, SOCK_CLOEXEC, SHUT_WR, SHUT_RDWR, AF_INET, AF_INET6, AF_UNIX

cdef extern from "evpl_helpers.h" nogil:
    void evpl_set_gso(msghdr* mh, void* ctl, uint16_t seg)
    unsigned evpl_gro_size(const void* ctl, size_t len)
    int UDP_GRO, EVPL_GRO_CTL

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    uint16_t ntohs(uint16_t)
    uint16_t htons(uint16_t)
    uint32_t ntohl(uint32_t)
    uint32_t htonl(uint32_t)
    int IPPROTO_TCP, IPPROTO_UDP

cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "<sys/un.h>" nogil:
    struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]
