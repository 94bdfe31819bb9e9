/* slice.h - sampling's share of the work on a vocabulary slice.
 *
 * With the LM head split by vocabulary, each rank of the last stage reduces its
 * own logits to softmax statistics and its best candidates (bn_sample_slice);
 * only those cross the network, never the logits. Rank 0's sampler
 * (coordinator/sampler.h) draws from the union of the slices' candidates, and a
 * plain temperature draw that lands outside them is finished by the slice that
 * owns it (bn_sample_tail). Here, below the coordinator, because every last-stage
 * rank runs it. The order of candidates is by logit, highest first, lower id on
 * ties; any slicing of the vocabulary into contiguous ranges gives the same
 * candidates as one slice.
 *
 * Exact: greedy; top-k up to BN_SAMPLER_CAP; plain temperature sampling (top-k 0,
 * top-p 1, min-p 0). Capped: with top-k 0 and top-p < 1 or min-p > 0, the kept
 * set never reaches beyond the union of the slices' candidates (BN_SAMPLER_CAP
 * per slice). Thread safe (no state). */
#ifndef BN_SLICE_H
#define BN_SLICE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    float temp;      /* >= 0; 0 = greedy */
    int32_t top_k;   /* >= 0; 0 = no limit */
    float top_p;     /* (0, 1] */
    float min_p;     /* [0, 1) */
    uint64_t seed;
} bn_sampler_params_t;

#define BN_SAMPLER_CAP 256

typedef struct {
    float logit;
    int32_t id;
} bn_cand_t;

typedef struct {
    float max;       /* largest logit of the slice */
    double sumexp;   /* sum of exp((logit - max) / temp) over the slice (0 unless needed) */
    uint32_t n_cand; /* candidates written */
} bn_slice_stats_t;

/* What a draw over the slices decided: a token, or a draw in slice `slice`'s tail
 * (its tokens worse than `last`, the last kept candidate) at `target` of
 * bn_sample_tail's sum. token -1 and slice -1: nothing to pick from. */
typedef struct {
    int32_t token; /* >= 0: the token; -1: ask the slice */
    int slice;
    bn_cand_t last;
    double target;
} bn_pick_t;

/* These parameters may draw past the slices' candidates (plain temperature
 * sampling), so a draw may need the owning slice's bn_sample_tail. */
static inline int bn_sampler_draws_tail(const bn_sampler_params_t *p)
{
    return p->temp > 0.0f && p->top_k == 0 && p->top_p >= 1.0f && p->min_p == 0.0f;
}

/* a is worse than b: lower logit, or the same logit and a higher id */
static inline int bn_cand_worse(bn_cand_t a, bn_cand_t b)
{
    return a.logit < b.logit || (a.logit == b.logit && a.id > b.id);
}
/* qsort order of candidates: best first (a total order, so qsort is deterministic) */
int bn_cand_cmp(const void *a, const void *b);

/* Index of the largest logit (lowest index on ties). */
int32_t bn_argmax(const float *logits, uint32_t n);
/* How many candidates a slice sends for these parameters (<= BN_SAMPLER_CAP). */
uint32_t bn_sampler_n_cand(const bn_sampler_params_t *p, uint32_t n);
/* Candidates (best first, ids off + index) and statistics of logits[0, n). */
void bn_sample_slice(const bn_sampler_params_t *p, const float *logits, uint32_t n, int32_t off,
                     bn_cand_t *cand, bn_slice_stats_t *st);
/* The token of a tail draw: walk the slice's tokens worse than last in id order,
 * summing exp((logit - st->max) / temp), and return the id where the sum passes
 * target (the last such token if rounding leaves it short; -1 if there is none). */
int32_t bn_sample_tail(const bn_sampler_params_t *p, const float *logits, uint32_t n, int32_t off,
                       const bn_slice_stats_t *st, bn_cand_t last, double target);

#endif
