/* kvcache.h - the keys and values of every sequence slot, for this rank's layers
 * and KV heads.
 *
 * What it is: one anonymous mapping per K and V, laid out (seq, layer of this
 * stage, KV head of this rank, position, head_dim): one KV head's positions
 * follow one another, so attention reads a head as one stream. Pages are mapped
 * lazily (demand paging): a sequence costs memory only for the positions it has
 * written, rounded up to whole 4 KB pages per (layer, KV head), and
 * bn_kvcache_release() gives a finished sequence's pages back to the system at
 * once (MADV_DONTNEED), so the next user of the slot starts from zero pages.
 * Why not paged blocks with block tables: the slot's virtual range already gives
 * each (layer, head) its own run of positions, and the kernel's page tables are
 * the block table, so attention keeps reading one contiguous stream per head;
 * the cost is virtual address space (n_seq * n_ctx * bytes per position), which
 * the kernel's overcommit check must accept (a context far beyond memory is
 * refused at start, as before).
 * What it is not: the per-step scratch (worker/forward.h, bn_state_t), or the
 * accounting of who holds which slot (coordinator/sched.c).
 * Element types (--kv-type): f32 (exact), f16 (rounded as stored), q8 or q4
 * (block floating point: each row of head_dim values is head_dim/32 blocks of
 * Q8_0 or Q4_0, one fp16 scale per 32 values; kernels/kernels.h, BN_KVQ_BLOCK).
 * Thread safety: rows may be written and read by the pool's threads during a
 * step; new/destroy/release on the main thread between steps. */
#ifndef BN_KVCACHE_H
#define BN_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

typedef enum { BN_KV_F32 = 0, BN_KV_F16 = 1, BN_KV_Q8 = 2, BN_KV_Q4 = 3 } bn_kv_type_t;
#define BN_KV_DEFAULT BN_KV_F16
const char *bn_kv_type_name(int t); /* "f32", "f16", "q8", "q4" */
int bn_kv_type_parse(const char *s); /* -1 when unknown */
/* Bytes of one cached row (head_dim values) of type t; 0 when t cannot hold
 * rows of head_dim (q8 and q4 need a multiple of 32, at most 512) */
size_t bn_kv_row_bytes(int t, uint32_t head_dim);
/* 8 or 4 for the block-quantized types, 0 for the float ones */
static inline int bn_kv_type_bits(int t)
{
    return t == BN_KV_Q8 ? 8 : t == BN_KV_Q4 ? 4 : 0;
}

typedef struct {
    int type;              /* bn_kv_type_t */
    uint32_t n_seq, n_ctx;
    uint32_t n_layer;      /* layers of this rank's stage */
    uint32_t n_kv;         /* this rank's KV heads */
    uint32_t head_dim;
    size_t row_bytes;      /* one cached row: bn_kv_row_bytes(type, head_dim) */
    size_t seq_bytes;      /* one sequence's K (or V) region */
    size_t bytes;          /* the whole K (or V) mapping */
    void *k, *v;           /* (n_seq, n_layer, n_kv, n_ctx, head_dim); NULL when n_kv or n_layer is 0 */
    uint32_t *forgot;      /* (n_seq) positions below this returned (bn_kvcache_forget) */
} bn_kvcache_t;

/* A cache of n_seq slots of n_ctx positions. BN_OK, BN_EINVAL or BN_ENOMEM. */
int bn_kvcache_new(uint32_t n_seq, uint32_t n_ctx, uint32_t n_layer, uint32_t n_kv, uint32_t head_dim, int type,
                   bn_kvcache_t **out, char *err, size_t errlen);
void bn_kvcache_destroy(bn_kvcache_t **kv);

/* The row of (seq, layer of this stage, KV head of this rank, pos) in K or V:
 * head_dim values of the cache's type (row_bytes). Positions of one head
 * follow this row. */
static inline void *bn_kvcache_row(const bn_kvcache_t *kv, const void *base, int seq, int layer, int kh, int pos)
{
    const size_t r = (((size_t)seq * kv->n_layer + (size_t)layer) * kv->n_kv + (size_t)kh) * kv->n_ctx + (size_t)pos;
    return (uint8_t *)base + r * kv->row_bytes;
}

/* Give slot seq's memory back to the system; its positions read as zero after. */
void bn_kvcache_release(bn_kvcache_t *kv, int seq);
/* Positions 0..n-1 of slot src copied into slot dst (every layer and KV head of
 * this rank): a prompt prefix computed once, reused by another sequence. */
void bn_kvcache_copy(bn_kvcache_t *kv, int src, int dst, uint32_t n);
/* Slot seq will never read positions below `below` again (a sliding window):
 * the whole pages of each (layer, KV head) run that lie below it go back to
 * the system. Cheap to call every step: it acts once per page's worth of
 * positions, and forgets what it returned when the slot is released. */
void bn_kvcache_forget(bn_kvcache_t *kv, int seq, uint32_t below);
/* Bytes of K and V one position of a sequence costs on this rank. */
size_t bn_kvcache_pos_bytes(const bn_kvcache_t *kv);
/* Resident bytes of K and V now (pages the system has mapped), counted with mincore. */
size_t bn_kvcache_resident(const bn_kvcache_t *kv);

#endif
