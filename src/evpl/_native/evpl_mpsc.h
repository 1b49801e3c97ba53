/* A multi-producer, single-consumer queue of calls for one loop (mpsc.pyx).
 *
 * Producers push onto a lock-free LIFO list with one compare-and-swap; the
 * consumer takes the whole list with one exchange and reverses it, so a
 * batch comes out in push order. The consumer never pops single nodes, so
 * there is no ABA problem. A counter bounds the queue. */
#ifndef EVPL_MPSC_H
#define EVPL_MPSC_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

/* A caller that waits for its call (CallQueue.call_wait) without the GIL.
 * The consumer stores the result with the GIL, then *publishes* it (state
 * DONE) only once it has released the GIL, so the caller, spinning on
 * `state` without the GIL, takes a free GIL and never sleeps in CPython's
 * take_gil (whose wake-up is a futex across cores). A caller that spun long
 * enough sleeps on `state` (SLEEPING) and the publisher wakes it. */
enum { EVPL_W_PENDING = 0, EVPL_W_DONE = 1, EVPL_W_SLEEPING = 2, EVPL_W_ABANDONED = 3 };

typedef struct evpl_waiter {
    uint32_t state;
    int failed;                 /* result is an exception */
    void *result;               /* PyObject*, owned; set by the consumer */
    struct evpl_waiter *next;   /* in the consumer's publish list */
} evpl_waiter;

typedef struct evpl_call {
    struct evpl_call *next;
    void *fn;           /* PyObject*, owned */
    void *args;         /* PyObject* (tuple), owned */
    void *fut;          /* PyObject* or NULL, owned */
    evpl_waiter *waiter;    /* or a caller waiting in call_wait (not owned) */
} evpl_call;

typedef struct evpl_mpsc {
    evpl_call *head;            /* most recent push first */
    char pad1[56];
    int64_t count;              /* queued, not yet taken by the consumer */
    int sleeping;               /* the consumer may sleep: ring its eventfd */
    int rung;                   /* the eventfd was written and not yet read */
    char pad2[48];
    /* the consumer's own: results stored, not yet published; waiters whose
     * caller gave up (freed with the GIL) */
    evpl_waiter *unpublished;
    evpl_waiter *abandoned;
} evpl_mpsc;

static inline evpl_mpsc *evpl_mpsc_new(void) {
    evpl_mpsc *q;
    if (posix_memalign((void **)&q, 64, sizeof(*q)) != 0) return NULL;
    q->head = NULL;
    q->count = 0;
    q->sleeping = 1;
    q->rung = 0;
    q->unpublished = NULL;
    q->abandoned = NULL;
    return q;
}

/* Reserve room for one call; 0 if the queue holds `cap` already. */
static inline int evpl_mpsc_reserve(evpl_mpsc *q, int64_t cap) {
    if (__atomic_add_fetch(&q->count, 1, __ATOMIC_SEQ_CST) > cap) {
        __atomic_sub_fetch(&q->count, 1, __ATOMIC_SEQ_CST);
        return 0;
    }
    return 1;
}

static inline void evpl_mpsc_unreserve(evpl_mpsc *q) {
    __atomic_sub_fetch(&q->count, 1, __ATOMIC_SEQ_CST);
}

/* Push a node; returns 1 if the consumer must be woken (it may be about to
 * sleep and nobody rang since it last read its eventfd). */
static inline int evpl_mpsc_push(evpl_mpsc *q, evpl_call *c) {
    evpl_call *old = __atomic_load_n(&q->head, __ATOMIC_RELAXED);
    do {
        c->next = old;
    } while (!__atomic_compare_exchange_n(&q->head, &old, c, 1, __ATOMIC_SEQ_CST,
                                          __ATOMIC_RELAXED));
    if (__atomic_load_n(&q->sleeping, __ATOMIC_SEQ_CST)
            && __atomic_exchange_n(&q->rung, 1, __ATOMIC_SEQ_CST) == 0)
        return 1;
    return 0;
}

static inline int evpl_mpsc_ready(evpl_mpsc *q) {
    return __atomic_load_n(&q->head, __ATOMIC_ACQUIRE) != NULL;
}

/* Take everything queued, oldest first; *n gets the count. */
static inline evpl_call *evpl_mpsc_take(evpl_mpsc *q, int64_t *n) {
    evpl_call *c = __atomic_exchange_n(&q->head, NULL, __ATOMIC_ACQ_REL), *prev = NULL, *next;
    int64_t k = 0;
    while (c) {
        next = c->next;
        c->next = prev;
        prev = c;
        c = next;
        k++;
    }
    if (k) __atomic_sub_fetch(&q->count, k, __ATOMIC_SEQ_CST);
    *n = k;
    return prev;
}

static inline void evpl_mpsc_set_sleeping(evpl_mpsc *q, int v) {
    __atomic_store_n(&q->sleeping, v, __ATOMIC_SEQ_CST);
}

static inline void evpl_mpsc_clear_rung(evpl_mpsc *q) {
    __atomic_store_n(&q->rung, 0, __ATOMIC_SEQ_CST);
}

static inline int64_t evpl_mpsc_count(evpl_mpsc *q) {
    return __atomic_load_n(&q->count, __ATOMIC_RELAXED);
}

static inline int64_t evpl_mpsc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Publish one result: wake its caller if it sleeps; a waiter whose caller
 * gave up goes to `abandoned` (freed later, with the GIL). */
static inline void evpl_waiter_complete(evpl_mpsc *q, evpl_waiter *w) {
    uint32_t old = __atomic_exchange_n(&w->state, EVPL_W_DONE, __ATOMIC_ACQ_REL);
    /* from here the caller may free w (unless it gave up) */
    if (old == EVPL_W_SLEEPING)
        syscall(SYS_futex, &w->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    else if (old == EVPL_W_ABANDONED) {
        evpl_waiter *head = __atomic_load_n(&q->abandoned, __ATOMIC_RELAXED);
        do {
            w->next = head;
        } while (!__atomic_compare_exchange_n(&q->abandoned, &head, w, 1, __ATOMIC_RELEASE,
                                              __ATOMIC_RELAXED));
    }
}

/* Keep a stored result to publish later (with the GIL held). */
static inline void evpl_mpsc_keep(evpl_mpsc *q, evpl_waiter *w) {
    evpl_waiter *head = __atomic_load_n(&q->unpublished, __ATOMIC_RELAXED);
    do {
        w->next = head;
    } while (!__atomic_compare_exchange_n(&q->unpublished, &head, w, 1, __ATOMIC_RELEASE,
                                          __ATOMIC_RELAXED));
}

/* Without the GIL (the loop has just released it): publish every result
 * kept. */
static inline void evpl_mpsc_publish(evpl_mpsc *q) {
    evpl_waiter *w, *next;
    if (!__atomic_load_n(&q->unpublished, __ATOMIC_RELAXED)) return;
    w = __atomic_exchange_n(&q->unpublished, NULL, __ATOMIC_ACQUIRE);
    while (w) {
        next = w->next;         /* read first: the caller may free w at once */
        evpl_waiter_complete(q, w);
        w = next;
    }
}

/* With the GIL: the waiters whose callers gave up, to free. */
static inline evpl_waiter *evpl_mpsc_take_abandoned(evpl_mpsc *q) {
    if (!__atomic_load_n(&q->abandoned, __ATOMIC_RELAXED)) return NULL;
    return __atomic_exchange_n(&q->abandoned, NULL, __ATOMIC_ACQUIRE);
}

/* The caller, without the GIL: spin up to spin_ns for the result, then
 * sleep up to sleep_ns. 1 when the result is published, 0 if not yet. */
static inline int evpl_waiter_wait(evpl_waiter *w, int64_t spin_ns, int64_t sleep_ns) {
    int64_t end = 0;
    uint32_t expected;
    unsigned i = 0;
    struct timespec ts;
    while (__atomic_load_n(&w->state, __ATOMIC_ACQUIRE) != EVPL_W_DONE) {
        if ((++i & 63) == 0) {
            int64_t now = evpl_mpsc_now_ns();
            if (end == 0) end = now + spin_ns;
            else if (now >= end) goto sleep;
        }
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield");
#endif
    }
    return 1;
sleep:
    expected = EVPL_W_PENDING;
    if (!__atomic_compare_exchange_n(&w->state, &expected, EVPL_W_SLEEPING, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
            && expected == EVPL_W_DONE)
        return 1;
    ts.tv_sec = sleep_ns / 1000000000LL;
    ts.tv_nsec = sleep_ns % 1000000000LL;
    syscall(SYS_futex, &w->state, FUTEX_WAIT_PRIVATE, EVPL_W_SLEEPING, &ts, NULL, 0);
    return __atomic_load_n(&w->state, __ATOMIC_ACQUIRE) == EVPL_W_DONE;
}

static inline int evpl_waiter_abandoned(evpl_waiter *w) {
    return __atomic_load_n(&w->state, __ATOMIC_ACQUIRE) == EVPL_W_ABANDONED;
}

/* The caller gives up waiting: 1 if the consumer now owns the waiter (it
 * frees it), 0 if the result was published meanwhile (the caller owns it). */
static inline int evpl_waiter_abandon(evpl_waiter *w) {
    uint32_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
    while (s != EVPL_W_DONE) {
        if (__atomic_compare_exchange_n(&w->state, &s, EVPL_W_ABANDONED, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 1;
    }
    return 0;
}

#endif
