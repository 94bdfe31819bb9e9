/* shard.h - the grid of a sharded run and the part of the model each rank holds.
 *
 * What it is: the types the planner (coordinator/plan.c, bn_plan_make) fills and
 * every rank reads: the model loader (which rows to bind), the forward pass and
 * the engine (where each step goes, which ranks answer). The same on every rank:
 * computed, never sent. Ranks are numbered replica-major: rank = (replica * P +
 * stage) * T + tp, so rank 0 is replica 0, stage 0, tensor rank 0.
 * Here, below the coordinator, so that worker/ never includes coordinator/. */
#ifndef BN_SHARD_H
#define BN_SHARD_H

#include <stdint.h>

typedef struct {
    int replica, stage, tp;    /* this rank's place in the grid */
    uint32_t layer0, layer1;   /* layers [layer0, layer1) of its stage */
    uint32_t head0, head1;     /* query heads */
    uint32_t kv0, kv1;         /* KV heads */
    uint32_t ff0, ff1;         /* FFN rows (gate/up rows, down columns) */
    uint32_t vocab0, vocab1;   /* LM head rows; empty unless the last stage */
    uint64_t weight_bytes;     /* its ternary rows/columns plus its LM head rows:
                                  a ternary row of n inputs is n / 4 bytes (the kernels'
                                  layout), a column slice of c inputs is padded to a
                                  multiple of 128 (ceil(c / 128) * 32 bytes per row):
                                  per layer wq (head1-head0)*head_dim rows of n_embd,
                                  wk and wv (kv1-kv0)*head_dim rows of n_embd, wo n_embd
                                  rows of (head1-head0)*head_dim columns, gate and up
                                  (ff1-ff0) rows of n_embd, down n_embd rows of
                                  (ff1-ff0) columns; a stage's layers times that, plus
                                  (vocab1-vocab0) * head_row_bytes */
    uint64_t kv_bytes;         /* its KV cache for n_seq x n_ctx positions:
                                  layers * n_seq * n_ctx * (kv1-kv0) * kv_bytes_per_pos / n_head_kv */
} bn_shard_t;

typedef struct {
    int world, R, P, T;
    bn_shard_t *rank;          /* (world) */
} bn_plan_t;

/* The rank at these coordinates, or -1 when they are outside the grid. */
static inline int bn_plan_rank(const bn_plan_t *p, int replica, int stage, int tp)
{
    if (replica < 0 || replica >= p->R || stage < 0 || stage >= p->P || tp < 0 || tp >= p->T)
        return -1;
    return (replica * p->P + stage) * p->T + tp;
}

#endif
