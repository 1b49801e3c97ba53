/* Shared-memory rings between shards (rings.pyx): one single-producer,
 * single-consumer byte ring per ordered pair of shards, and one control
 * block per shard, all in one memfd mapped by every shard.
 *
 * A record is a 16-byte header (payload length, kind, id) and the payload,
 * padded to 8 bytes. A record never wraps: when it does not fit before the
 * end of the ring, a PAD record fills the rest and it starts at offset 0.
 * The producer publishes `tail` (release) once per batch of records (at the
 * end of its loop iteration, or when a batch grows large), not per record;
 * the consumer publishes `head` after it has taken a batch. */
#ifndef EVPL_RINGS_H
#define EVPL_RINGS_H

#include <stdint.h>
#include <string.h>

#define EVPL_RING_PAD 0xffffffffu
#define EVPL_RINGS_MAGIC 0x65767072696e6773ULL

typedef struct {
    uint64_t head;              /* consumer: bytes consumed */
    char pad0[56];
    uint64_t tail;              /* producer: bytes published */
    char pad1[56];
    int want_room;              /* producer found it full and waits */
    char pad2[60];
} evpl_ring_hdr;                /* followed by the ring's bytes */

typedef struct {
    int sleeping;               /* its loop may sleep: ring its eventfd */
    int rung;                   /* eventfd written, not yet read */
    int room;                   /* a ring it waits on has room again */
    int state;                  /* 0 starting, 1 running, 2 gone */
    int pid;
    int generation;             /* restarts */
    char pad[40];
} evpl_shard_ctl;

typedef struct {
    uint64_t magic;
    uint64_t ring_bytes;
    int n;
    int epoch;                  /* bumped when a shard comes or goes, or the group stops */
    int stop;                   /* a shard asked the whole group to stop */
    char pad[36];
} evpl_rings_hdr;

typedef struct {
    uint32_t len;
    uint32_t kind;
    uint64_t id;
} evpl_rec;

static inline size_t evpl_rings_size(int n, uint64_t ring_bytes) {
    return sizeof(evpl_rings_hdr) + (size_t)n * sizeof(evpl_shard_ctl)
        + (size_t)n * n * (sizeof(evpl_ring_hdr) + ring_bytes);
}

static inline evpl_shard_ctl *evpl_rings_ctl(void *base, int i) {
    return (evpl_shard_ctl *)((char *)base + sizeof(evpl_rings_hdr)) + i;
}

static inline evpl_ring_hdr *evpl_rings_ring(void *base, int n, uint64_t ring_bytes, int from, int to) {
    char *p = (char *)base + sizeof(evpl_rings_hdr) + (size_t)n * sizeof(evpl_shard_ctl);
    return (evpl_ring_hdr *)(p + ((size_t)from * n + to) * (sizeof(evpl_ring_hdr) + ring_bytes));
}

static inline size_t evpl_rec_size(uint32_t len) {
    return (sizeof(evpl_rec) + len + 7) & ~(size_t)7;
}

/* The producer's private side of one ring: where it writes next (`tail`,
 * ahead of the published r->tail while a batch is being written) and the
 * consumer's position it last read (`head`, reloaded only when the ring
 * looks full), so that writing a record touches no line the consumer
 * writes, and the consumer sees whole batches. */
typedef struct {
    uint64_t tail;
    uint64_t head;
} evpl_ring_tx;

static inline void evpl_ring_tx_init(evpl_ring_tx *t, evpl_ring_hdr *r) {
    t->tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    t->head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
}

/* Publish what was written: the consumer may take it from now on. */
static inline void evpl_ring_publish(evpl_ring_hdr *r, evpl_ring_tx *t) {
    __atomic_store_n(&r->tail, t->tail, __ATOMIC_RELEASE);
}

/* Bytes written and not published yet. */
static inline uint64_t evpl_ring_unpublished(evpl_ring_hdr *r, evpl_ring_tx *t) {
    return t->tail - r->tail;       /* r->tail: ours, no other writer */
}

/* Write one record at the producer's private tail (not published: see
 * evpl_ring_publish); 0 if it does not fit now (the ring is full). */
static inline int evpl_ring_put(evpl_ring_hdr *r, evpl_ring_tx *t, uint64_t size,
                                uint32_t kind, uint64_t id, const void *data, uint32_t len) {
    char *buf = (char *)(r + 1);
    uint64_t tail = t->tail;
    size_t need = evpl_rec_size(len);
    uint64_t off = tail & (size - 1);
    size_t pad = 0;
    evpl_rec *h;
    if (off + need > size) pad = size - off;
    if (tail + pad + need - t->head > size) {
        t->head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
        if (tail + pad + need - t->head > size) return 0;
    }
    if (pad) {
        h = (evpl_rec *)(buf + off);
        h->len = 0;
        h->kind = EVPL_RING_PAD;
        h->id = 0;
        tail += pad;
        off = 0;
    }
    h = (evpl_rec *)(buf + off);
    h->len = len;
    h->kind = kind;
    h->id = id;
    if (len) memcpy(h + 1, data, len);
    t->tail = tail + need;
    return 1;
}

static inline int evpl_ring_ready(evpl_ring_hdr *r) {
    return __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE) != __atomic_load_n(&r->head, __ATOMIC_RELAXED);
}

/* The record at the consumer's position `*pos` (advanced past it), skipping
 * PAD records; NULL when `*pos` reached `tail`. */
static inline evpl_rec *evpl_ring_next(evpl_ring_hdr *r, uint64_t size, uint64_t *pos, uint64_t tail) {
    char *buf = (char *)(r + 1);
    evpl_rec *h;
    while (*pos != tail) {
        h = (evpl_rec *)(buf + (*pos & (size - 1)));
        if (h->kind == EVPL_RING_PAD) {
            *pos += size - (*pos & (size - 1));
            continue;
        }
        *pos += evpl_rec_size(h->len);
        return h;
    }
    return NULL;
}

#endif
