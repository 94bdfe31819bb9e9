/* sampler.h - choosing the next token from logits (rank 0, one sampler per sequence).
 *
 * temp 0 is greedy (argmax, lowest id on ties). Otherwise, in this order:
 * logits / temp, keep the top_k best (0 = all), softmax, keep the smallest set
 * whose probability reaches top_p (1 = all), drop tokens below min_p times the
 * best probability (0 = none), renormalise and draw with the seeded generator.
 * The same seed and parameters give the same tokens. bn_sampler_sample() is
 * worker/slice.h's steps on one slice followed by bn_sampler_pick(); with the
 * vocabulary split over ranks, the slices run on the ranks and only the pick
 * here (worker/slice.h says what is exact and what is capped). Not thread safe. */
#ifndef BN_SAMPLER_H
#define BN_SAMPLER_H

#include "worker/slice.h"

#include <stddef.h>
#include <stdint.h>

typedef struct bn_sampler bn_sampler_t;

/* Check parameters: BN_OK or BN_EINVAL naming the bad one. */
int bn_sampler_check(const bn_sampler_params_t *p, char *err, size_t errlen);
/* New sampler for a vocabulary of n_vocab; BN_OK, BN_EINVAL or BN_ENOMEM. */
int bn_sampler_new(const bn_sampler_params_t *p, uint32_t n_vocab, bn_sampler_t **out,
                   char *err, size_t errlen);
void bn_sampler_destroy(bn_sampler_t **s);
/* Next token from logits (n_vocab). logits are not modified. */
int32_t bn_sampler_sample(bn_sampler_t *s, const float *logits);
/* One draw from the union of n_slices slices' statistics and candidates
 * (cand holds each slice's st[i].n_cand candidates in turn). */
bn_pick_t bn_sampler_pick(bn_sampler_t *s, const bn_slice_stats_t *st, int n_slices, const bn_cand_t *cand);
/* The parameters a sampler was made with. */
const bn_sampler_params_t *bn_sampler_params(const bn_sampler_t *s);

#endif
