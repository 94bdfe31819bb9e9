/* sampler.c - temperature, top-k, top-p, min-p sampling. See sampler.h. */
#include "coordinator/sampler.h"

#include "proto/status.h"

#include <math.h>
#include <stdlib.h>

struct bn_sampler {
    bn_sampler_params_t p;
    uint32_t n_vocab;
    uint64_t rng[4];          /* xoshiro256** state */
    struct cand { float logit; int32_t id; } *cand; /* (n_vocab) */
    float *prob;              /* (n_vocab) */
};

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(uint64_t *s)
{
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* uniform in [0, 1) with 53 random bits */
static double next_unit(uint64_t *s)
{
    return (double)(next_u64(s) >> 11) * (1.0 / 9007199254740992.0);
}

int bn_sampler_check(const bn_sampler_params_t *p, char *err, size_t errlen)
{
    if (!(p->temp >= 0.0f && p->temp <= 100.0f))
        return bn_err(err, errlen, BN_EINVAL, "temperature %g must be in [0, 100]", (double)p->temp);
    if (p->top_k < 0)
        return bn_err(err, errlen, BN_EINVAL, "top-k %d must be >= 0", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return bn_err(err, errlen, BN_EINVAL, "top-p %g must be in (0, 1]", (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p < 1.0f))
        return bn_err(err, errlen, BN_EINVAL, "min-p %g must be in [0, 1)", (double)p->min_p);
    return BN_OK;
}

int bn_sampler_new(const bn_sampler_params_t *p, uint32_t n_vocab, bn_sampler_t **out,
                   char *err, size_t errlen)
{
    *out = NULL;
    int rc = bn_sampler_check(p, err, errlen);
    if (rc)
        return rc;
    bn_sampler_t *s = calloc(1, sizeof *s);
    if (!s)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the sampler");
    s->p = *p;
    s->n_vocab = n_vocab;
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    s->prob = malloc((size_t)n_vocab * sizeof *s->prob);
    if (!s->cand || !s->prob) {
        bn_sampler_destroy(&s);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for the sampler");
    }
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix64(&x);
    *out = s;
    return BN_OK;
}

void bn_sampler_destroy(bn_sampler_t **ps)
{
    if (!ps || !*ps)
        return;
    free((*ps)->cand);
    free((*ps)->prob);
    free(*ps);
    *ps = NULL;
}

int32_t bn_argmax(const float *logits, uint32_t n)
{
    int32_t best = 0;
    for (uint32_t i = 1; i < n; i++)
        if (logits[i] > logits[best])
            best = (int32_t)i;
    return best;
}

/* descending by logit, ascending id on ties: a total order, so qsort is deterministic */
static int cmp_cand(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    if (x->logit != y->logit)
        return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

int32_t bn_sampler_sample(bn_sampler_t *s, const float *logits)
{
    if (s->p.temp == 0.0f)
        return bn_argmax(logits, s->n_vocab);
    uint32_t n = s->n_vocab;
    for (uint32_t i = 0; i < n; i++) {
        s->cand[i].logit = logits[i] / s->p.temp;
        s->cand[i].id = (int32_t)i;
    }
    qsort(s->cand, n, sizeof *s->cand, cmp_cand);
    if (s->p.top_k > 0 && (uint32_t)s->p.top_k < n)
        n = (uint32_t)s->p.top_k;
    double sum = 0.0;
    float mx = s->cand[0].logit;
    for (uint32_t i = 0; i < n; i++) {
        s->prob[i] = expf(s->cand[i].logit - mx);
        sum += s->prob[i];
    }
    /* top-p: the smallest prefix whose mass reaches top_p */
    if (s->p.top_p < 1.0f) {
        double acc = 0.0;
        for (uint32_t i = 0; i < n; i++) {
            acc += s->prob[i] / sum;
            if (acc >= s->p.top_p) {
                n = i + 1;
                break;
            }
        }
    }
    /* min-p: drop tokens below min_p times the best probability (prob[0] = 1 here) */
    if (s->p.min_p > 0.0f) {
        uint32_t keep = 1;
        while (keep < n && s->prob[keep] >= s->p.min_p)
            keep++;
        n = keep;
    }
    double total = 0.0;
    for (uint32_t i = 0; i < n; i++)
        total += s->prob[i];
    double r = next_unit(s->rng) * total, acc = 0.0;
    for (uint32_t i = 0; i < n; i++) {
        acc += s->prob[i];
        if (r < acc)
            return s->cand[i].id;
    }
    return s->cand[n - 1].id;
}
