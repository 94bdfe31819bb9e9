/* forward.h - run state and the forward pass of a BitNet b1.58 model.
 *
 * What it is: bn_forward() evaluates a batch of (sequence, position, token)
 * entries: one call prefills a prompt, or advances many sequences by one token,
 * or mixes both. Each sequence slot has its own KV cache (f32 for now). The work of
 * each step is split over a thread pool by output rows (matrices), tokens (norms,
 * quantization) or (token, head) pairs (attention).
 * What it is not: sampling or tokenization (coordinator/), sharding (worker/comm).
 * Invariants: an entry at position p of sequence s sees the cached keys/values of
 * positions 0..p of s, so positions 0..p-1 must have been evaluated before or in
 * the same batch. Not thread safe: one state per caller. */
#ifndef BN_FORWARD_H
#define BN_FORWARD_H

#include "kernels/pool.h"
#include "worker/model.h"

typedef struct {
    int32_t seq;          /* sequence slot, < n_seq */
    int32_t pos;          /* position in that sequence, < n_ctx */
    int32_t token;        /* token id, < n_vocab */
    int32_t want_logits;  /* nonzero: write this entry's logits */
} bn_batch_entry_t;

typedef struct {
    uint32_t n_ctx, n_seq, max_batch;
    uint32_t kv_dim, q_dim;
    bn_pool_t *pool;      /* not owned; NULL = the calling thread alone */
    /* per token of the current chunk */
    float *x;             /* (max_batch, n_embd) residual stream */
    float *xn;            /* (max_batch, wide) normed input of a BitLinear; wide = max(n_embd, q_dim, n_ff) */
    int8_t *xq;           /* (max_batch, wide) its int8 quantization */
    float *xs;            /* (max_batch) quantization scales */
    int32_t *xqsum;       /* (max_batch) sums of the int8 values */
    float *q, *k, *v;     /* (max_batch, q_dim), (max_batch, kv_dim) x2 */
    float *att;           /* (max_batch, q_dim) attention output */
    float *gate, *up;     /* (max_batch, n_ff) */
    float *out;           /* (max_batch, n_embd) output of o/down projections */
    float *rope;          /* (max_batch, rope_dim) cos/sin per token */
    int8_t *hq;           /* (max_batch, n_embd) LM head input blocks */
    float *hd;            /* (max_batch, n_embd/32) their scales */
    /* KV cache */
    float *key_cache;     /* (n_seq, n_layer, n_ctx, kv_dim) */
    float *value_cache;   /* (n_seq, n_layer, n_ctx, kv_dim) */
    size_t cache_bytes;   /* of each */
} bn_state_t;

/* Allocate run state for n_seq sequences of up to n_ctx positions, computing with
 * `pool` (may be NULL). Cache pages are touched only as positions are used.
 * Returns BN_OK, BN_EINVAL or BN_ENOMEM. */
int bn_state_new(const bn_model_t *m, uint32_t n_ctx, uint32_t n_seq, bn_pool_t *pool, bn_state_t **out,
                 char *err, size_t errlen);
void bn_state_destroy(bn_state_t **st);

/* Evaluate n entries. logits (n_with_logits, n_vocab) gets one row per entry with
 * want_logits, in entry order; may be NULL when none want logits. Returns BN_OK,
 * or BN_EINVAL/BN_ECONTEXT naming the bad entry (then nothing was evaluated). */
int bn_forward(const bn_model_t *m, bn_state_t *st, const bn_batch_entry_t *batch, int n,
               float *logits, char *err, size_t errlen);

#endif
