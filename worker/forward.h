/* forward.h - run state and the forward pass of a BitNet b1.58 model.
 *
 * What it is: bn_forward() evaluates a batch of (sequence, position, token)
 * entries: one call prefills a prompt, or advances many sequences by one token,
 * or mixes both. Each sequence slot has its own rows of the KV cache
 * (worker/kvcache.h; --kv-type f16 or f32). The work of
 * each step is split over a thread pool by output rows (matrices), tokens (norms,
 * quantization) or (token, head) pairs (attention).
 * What it is not: sampling or tokenization (coordinator/), MPI (worker/comm.c,
 * reached through bn_dist_t).
 * Invariants: an entry at position p of sequence s sees the cached keys/values of
 * positions 0..p of s, so positions 0..p-1 must have been evaluated before or in
 * the same batch. Not thread safe: one state per caller. */
#ifndef BN_FORWARD_H
#define BN_FORWARD_H

#include "kernels/pool.h"
#include "worker/dist.h"
#include "worker/kvcache.h"
#include "worker/model.h"

typedef struct {
    int32_t seq;          /* sequence slot, < n_seq */
    int32_t pos;          /* position in that sequence, < n_ctx */
    int32_t token;        /* token id, < n_vocab */
    int32_t want_logits;  /* nonzero: write this entry's logits */
} bn_batch_entry_t;

typedef struct {
    uint32_t n_ctx, n_seq, max_batch;
    uint32_t kv_dim, q_dim; /* this rank's KV heads and query heads, times head_dim */
    uint32_t n_ff;          /* this rank's FFN rows */
    uint32_t q_pad, ff_pad; /* q_dim and n_ff rounded up to 128: the o and down inputs */
    const bn_dist_t *dist;  /* NULL: the whole model is here */
    bn_pool_t *pool;      /* not owned; NULL = the calling thread alone */
    /* per token of the current chunk */
    float *x;             /* (max_batch, n_embd) residual stream */
    float *xn;            /* (max_batch, wide) normed input of a BitLinear; wide = max(n_embd, q_pad, ff_pad) */
    int8_t *xq;           /* (max_batch, wide) its int8 quantization */
    float *xs;            /* (max_batch) quantization scales */
    float *xr;            /* (max_batch) 1 / rms of a sub-norm over every tensor rank */
    float *ones;          /* (max_batch) 1.0: integer partial sums of row-parallel matrices */
    double *stats;        /* (max_batch, 1 + blocks) a sub-norm's max|v * norm| and the
                             sums of squares of its blocks (zero for other ranks' blocks) */
    double *stats_all;    /* (tp, max_batch, 1 + blocks) the same from every tensor rank */
    size_t stats_len;     /* 1 + the most blocks of any sub-norm */
    int32_t *xqsum;       /* (max_batch) sums of the int8 values */
    float *q, *k, *v;     /* (max_batch, q_dim), (max_batch, kv_dim) x2 */
    float *att;           /* (max_batch, q_dim) attention output */
    uint32_t att_run;     /* positions one attention call covers at most: longer
                             contexts are cut into runs of this many, done apart
                             and merged (f16, q8, q4 caches) */
    uint32_t att_runs;    /* runs of a full context: ceil(n_ctx / att_run) */
    float *att_part;      /* (max_batch, att_runs, q_dim) each run's output */
    float *att_ml;        /* (max_batch, att_runs, heads, 2) each run's softmax max and sum */
    float *gate, *up;     /* (max_batch, n_ff) this rank's FFN rows */
    float *out;           /* (max_batch, n_embd) output of o/down projections */
    float *rope;          /* (max_batch, rope_dim) cos/sin per token */
    int8_t *hq;           /* (max_batch, n_embd) LM head input blocks */
    float *hd;            /* (max_batch, n_embd/32) their scales */
    int kv_type;          /* bn_kv_type_t, of kv */
    double t_attention;   /* seconds spent in attention so far (for benchmarks) */
    uint32_t window;      /* 0: attend to every earlier position; N: to the last N
                             only (--window; changes the model's output), the
                             pages of positions that fall out returned */
    bn_kvcache_t *kv;     /* the KV cache (worker/kvcache.h), owned */
} bn_state_t;

/* Allocate run state for n_seq sequences of up to n_ctx positions with its own
 * KV cache of kv_type (st->kv), computing with `pool` (may be NULL). Cache pages
 * are touched only as positions are used. Returns BN_OK, BN_EINVAL or BN_ENOMEM. */
int bn_state_new(const bn_model_t *m, uint32_t n_ctx, uint32_t n_seq, int kv_type, bn_pool_t *pool,
                 bn_state_t **out, char *err, size_t errlen);
void bn_state_destroy(bn_state_t **st);
/* Compute as one rank of a sharded model (d not owned; NULL = alone). BN_OK or BN_ENOMEM. */
int bn_state_set_dist(bn_state_t *st, const bn_dist_t *d, char *err, size_t errlen);

/* Evaluate n entries with this rank's part of the model: the first stage embeds
 * the tokens, later stages receive x from the one before, every stage but the
 * last hands x on. On the last stage logits (n_with_logits, head.n_out) gets one
 * row per entry with want_logits, in entry order, for this rank's vocabulary rows
 * [shard.vocab0, shard.vocab1); logits may be NULL when none want them or on other
 * stages. Every rank of a replica must make the same call. Returns BN_OK,
 * BN_EINVAL/BN_ECONTEXT naming the bad entry (then nothing was evaluated), or
 * the status of a failed exchange. */
int bn_forward(const bn_model_t *m, bn_state_t *st, const bn_batch_entry_t *batch, int n,
               float *logits, char *err, size_t errlen);

#endif
