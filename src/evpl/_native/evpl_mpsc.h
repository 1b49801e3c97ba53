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

typedef struct evpl_call {
    struct evpl_call *next;
    void *fn;           /* PyObject*, owned */
    void *args;         /* PyObject* (tuple), owned */
    void *fut;          /* PyObject* or NULL, owned */
} evpl_call;

typedef struct evpl_mpsc {
    evpl_call *head;            /* most recent push first */
    char pad1[56];
    int64_t count;              /* queued, not yet taken by the consumer */
    int sleeping;               /* the consumer may sleep: ring its eventfd */
    int rung;                   /* the eventfd was written and not yet read */
    char pad2[48];
} evpl_mpsc;

static inline evpl_mpsc *evpl_mpsc_new(void) {
    evpl_mpsc *q;
    if (posix_memalign((void **)&q, 64, sizeof(*q)) != 0) return NULL;
    q->head = NULL;
    q->count = 0;
    q->sleeping = 1;
    q->rung = 0;
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

#endif
