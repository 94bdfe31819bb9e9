/* plan.h - how a model is sharded over the MPI world (DESIGN.md section 3).
 *
 * What it is: a pure function from the world size, the model's shape and bytes,
 * memory per rank and the user's pins (--tp, --pp, --replicas) to a grid of
 * replicas x stages x tensor ranks, and for every rank the part of the model it
 * holds. No MPI here: the worker's comm module asks for the world, the planner
 * answers, every rank computes the same plan from the same inputs.
 *
 * Ranks are numbered replica-major: rank = (replica * P + stage) * T + tp, so
 * rank 0 is replica 0, stage 0, tensor rank 0 (the coordinator).
 *
 * Splits (tp of T inside a stage):
 * - KV heads and query heads: when T divides n_head_kv, whole KV groups,
 *   contiguous, the same number on every rank (group g = n_head / n_head_kv
 *   query heads each); otherwise query heads contiguous and as even as possible,
 *   and each rank holds the KV heads its query heads read (a KV head is then
 *   replicated on the ranks that share it: a little KV memory for an even split
 *   of the work). When T > n_head some ranks hold no heads.
 * - FFN rows: blocks of BN_PLAN_FFN_BLOCK rows (the last block may be partial when
 *   n_ff is not a multiple), contiguous, as even as possible; some ranks may hold
 *   none when T exceeds the number of blocks.
 * - LM head (vocabulary) rows: only on the last stage, in blocks of
 *   BN_PLAN_VOCAB_BLOCK rows, contiguous, as even as possible.
 * - Layers (stage s of P): contiguous ranges, at least one layer per stage,
 *   balanced by bytes per rank with the LM head counted on the last stage.
 * "As even as possible" for n units over T ranks: rank t gets [t*n/T, (t+1)*n/T)
 * (integer division), so shares differ by at most one unit. */
#ifndef BN_PLAN_H
#define BN_PLAN_H

#include "worker/shard.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define BN_PLAN_FFN_BLOCK 128
#define BN_PLAN_VOCAB_BLOCK 8

/* What the planner needs to know about the model. */
typedef struct {
    uint32_t n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, n_vocab;
    uint64_t head_row_bytes;   /* one LM head row in its --lm-head format */
    uint64_t kv_bytes_per_pos; /* KV cache of one layer for one position, all KV heads, K and V */
} bn_plan_model_t;

typedef struct {
    int world;                 /* ranks, >= 1 */
    int ranks_per_node;        /* ranks sharing this node (>= 1; the smallest over nodes) */
    uint64_t mem_per_rank;     /* bytes a rank may use; 0 = unknown (no memory check) */
    uint32_t n_ctx;            /* positions of KV cache each sequence gets */
    uint32_t n_seq;            /* sequences each replica holds at once */
    int tp, pp, replicas;      /* pins; 0 = let the planner choose */
} bn_plan_in_t;

/* Make the plan. Pins that cannot work (a pin < 0, product not dividing the world,
 * more stages than layers, a plan whose rank does not fit mem_per_rank when it is
 * known) give BN_EINVAL with a message naming the constraint, e.g. "--pp 5: the
 * model has 4 layers and every stage needs at least one". Without pins the planner
 * chooses (rule of thumb from DESIGN.md: tensor ranks within a node, replicas when
 * the model fits, stages when it does not):
 *   T = the largest divisor of world that is <= ranks_per_node;
 *   then among the divisors P of world / T, the smallest for which every rank fits
 *   mem_per_rank (P = 1 when memory is unknown), and R = world / (T * P);
 *   if no P fits, BN_EINVAL saying how many bytes the smallest shard needs.
 * With some pins, the unpinned values are chosen by the same rule among those
 * whose product with the pins is the world.
 * On success the caller owns out->rank (bn_plan_free). */
int bn_plan_make(const bn_plan_model_t *m, const bn_plan_in_t *in, bn_plan_t *out, char *err, size_t errlen);
void bn_plan_free(bn_plan_t *p);

/* The plan in a few human lines: the grid, then one line per rank with its
 * layers, heads, KV heads, FFN rows, vocabulary rows and bytes (weights and KV,
 * in MB). Each line starts with `prefix`. */
void bn_plan_print(const bn_plan_t *p, FILE *f, const char *prefix);

#endif
