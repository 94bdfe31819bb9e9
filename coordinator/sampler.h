/* sampler.h - choosing the next token from logits.
 *
 * temp 0 is greedy (argmax, lowest id on ties). Otherwise, in this order:
 * logits / temp, keep the top_k best (0 = all), softmax, keep the smallest set
 * whose probability reaches top_p (1 = all), drop tokens below min_p times the
 * best probability (0 = none), renormalise and draw with the seeded generator.
 * The same seed and parameters give the same tokens. One sampler per sequence;
 * not thread safe. */
#ifndef BN_SAMPLER_H
#define BN_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    float temp;      /* >= 0; 0 = greedy */
    int32_t top_k;   /* >= 0; 0 = no limit */
    float top_p;     /* (0, 1] */
    float min_p;     /* [0, 1) */
    uint64_t seed;
} bn_sampler_params_t;

typedef struct bn_sampler bn_sampler_t;

/* Check parameters: BN_OK or BN_EINVAL naming the bad one. */
int bn_sampler_check(const bn_sampler_params_t *p, char *err, size_t errlen);
/* New sampler for a vocabulary of n_vocab; BN_OK, BN_EINVAL or BN_ENOMEM. */
int bn_sampler_new(const bn_sampler_params_t *p, uint32_t n_vocab, bn_sampler_t **out,
                   char *err, size_t errlen);
void bn_sampler_destroy(bn_sampler_t **s);
/* Next token from logits (n_vocab). logits are not modified. */
int32_t bn_sampler_sample(bn_sampler_t *s, const float *logits);
/* Index of the largest logit (lowest index on ties). */
int32_t bn_argmax(const float *logits, uint32_t n);

/* ---- Sampling over a vocabulary split into slices (one per rank) ----
 *
 * bn_sampler_sample() is these three steps on one slice. With the LM head split
 * by vocabulary, each rank runs bn_sample_slice() on its own logits; only the
 * statistics and candidates travel; the coordinator runs bn_sampler_pick(). The
 * order of candidates is by logit, highest first, lower id on ties. The kept
 * candidates are the best of the union, so any slicing of the vocabulary into
 * contiguous ranges gives the same draws as one slice (up to float rounding in
 * the sums).
 *
 * Exact: greedy; top-k up to BN_SAMPLER_CAP; plain temperature sampling (top-k 0,
 * top-p 1, min-p 0), whose draw may land in the mass outside the candidates and
 * is then finished by the slice that owns it (bn_sample_tail). Capped: with top-k
 * 0 and top-p < 1 or min-p > 0, the kept set never reaches beyond the union of
 * the slices' candidates (BN_SAMPLER_CAP per slice). */
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

/* How many candidates a slice sends for these parameters (<= BN_SAMPLER_CAP). */
uint32_t bn_sampler_n_cand(const bn_sampler_params_t *p, uint32_t n);
/* Candidates (best first, ids off + index) and statistics of logits[0, n). */
void bn_sample_slice(const bn_sampler_params_t *p, const float *logits, uint32_t n, int32_t off,
                     bn_cand_t *cand, bn_slice_stats_t *st);

/* What bn_sampler_pick() decided: a token, or a draw in slice `slice`'s tail
 * (its tokens worse than `last`, the last kept candidate) at `target` of
 * bn_sample_tail's sum. token -1 and slice -1: nothing to pick from. */
typedef struct {
    int32_t token; /* >= 0: the token; -1: ask the slice */
    int slice;
    bn_cand_t last;
    double target;
} bn_pick_t;

/* One draw from the union of n_slices slices' statistics and candidates
 * (cand holds each slice's st[i].n_cand candidates in turn). */
bn_pick_t bn_sampler_pick(bn_sampler_t *s, const bn_slice_stats_t *st, int n_slices, const bn_cand_t *cand);
/* The token of a tail draw: walk the slice's tokens worse than last in id order,
 * summing exp((logit - st->max) / temp), and return the id where the sum passes
 * target (the last such token if rounding leaves it short; -1 if there is none). */
int32_t bn_sample_tail(const bn_sampler_params_t *p, const float *logits, uint32_t n, int32_t off,
                       const bn_slice_stats_t *st, bn_cand_t last, double target);
/* The parameters a sampler was made with. */
const bn_sampler_params_t *bn_sampler_params(const bn_sampler_t *s);

#endif
