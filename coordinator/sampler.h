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

#endif
