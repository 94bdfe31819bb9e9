/* sampler.c - temperature, top-k, top-p, min-p sampling. See sampler.h. */
#include "coordinator/sampler.h"

#include "base/status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct bn_sampler {
    bn_sampler_params_t p;
    uint32_t n_vocab;
    uint64_t rng[4];          /* xoshiro256** state */
    bn_cand_t *cand;          /* (cap) the union of the slices' candidates */
    float *prob;              /* (cap) their unnormalised probabilities */
    uint32_t cap;
    bn_cand_t slice[BN_SAMPLER_CAP]; /* one slice's candidates, for bn_sampler_sample */
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
    s->cap = n_vocab > BN_SAMPLER_CAP ? n_vocab : BN_SAMPLER_CAP;
    s->cand = malloc((size_t)s->cap * sizeof *s->cand);
    s->prob = malloc((size_t)s->cap * sizeof *s->prob);
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

const bn_sampler_params_t *bn_sampler_params(const bn_sampler_t *s)
{
    return &s->p;
}

/* weight of slice i's tokens outside the kept candidates, in units of exp((logit - mx) / temp) */
static double tail_weight(const bn_slice_stats_t *st, const bn_cand_t *cand, size_t first, bn_cand_t last,
                          float mx, float inv)
{
    if (!st->n_cand)
        return 0.0;
    double in = 0.0;
    for (uint32_t j = 0; j < st->n_cand; j++)
        if (!bn_cand_worse(cand[first + j], last))
            in += expf((cand[first + j].logit - st->max) * inv);
    double t = (st->sumexp - in) * exp((double)(st->max - mx) * inv);
    return t > 0.0 ? t : 0.0;
}

bn_pick_t bn_sampler_pick(bn_sampler_t *s, const bn_slice_stats_t *st, int n_slices, const bn_cand_t *cand)
{
    const bn_sampler_params_t *p = &s->p;
    bn_pick_t none = { .token = -1, .slice = -1 };
    size_t n_all = 0;
    for (int i = 0; i < n_slices; i++)
        n_all += st[i].n_cand;
    if (n_all == 0)
        return none;
    if (n_all > s->cap) {
        bn_cand_t *c = realloc(s->cand, n_all * sizeof *c);
        if (c)
            s->cand = c;
        float *w = realloc(s->prob, n_all * sizeof *w);
        if (w)
            s->prob = w;
        if (!c || !w)
            return none;
        s->cap = (uint32_t)n_all;
    }
    memcpy(s->cand, cand, n_all * sizeof *cand);
    qsort(s->cand, n_all, sizeof *s->cand, bn_cand_cmp);
    if (p->temp == 0.0f)
        return (bn_pick_t){ .token = s->cand[0].id, .slice = -1 };
    /* the kept candidates are the best n of the union, whatever the slicing: the
     * same set a single slice would send */
    uint32_t n = bn_sampler_n_cand(p, (uint32_t)n_all);
    const bn_cand_t last = s->cand[n - 1];
    const float mx = s->cand[0].logit, inv = 1.0f / p->temp;
    double z = 0.0; /* the softmax's denominator: over the top-k, or the whole vocabulary */
    for (uint32_t i = 0; i < n; i++) {
        s->prob[i] = expf((s->cand[i].logit - mx) * inv);
        z += s->prob[i];
    }
    if (p->top_k == 0) {
        z = 0.0;
        for (int i = 0; i < n_slices; i++)
            if (st[i].n_cand)
                z += st[i].sumexp * exp((double)(st[i].max - mx) * inv);
    }
    /* top-p: the smallest prefix whose mass reaches top_p (or every candidate: the cap) */
    if (p->top_p < 1.0f) {
        double acc = 0.0;
        for (uint32_t i = 0; i < n; i++) {
            acc += s->prob[i] / z;
            if (acc >= p->top_p) {
                n = i + 1;
                break;
            }
        }
    }
    /* min-p: drop tokens below min_p times the best probability (prob[0] = 1 here) */
    if (p->min_p > 0.0f) {
        uint32_t keep = 1;
        while (keep < n && s->prob[keep] >= p->min_p)
            keep++;
        n = keep;
    }
    /* plain temperature sampling also draws from what lies outside the candidates */
    const int tails = p->top_k == 0 && p->top_p >= 1.0f && p->min_p == 0.0f;
    double total = 0.0;
    for (uint32_t i = 0; i < n; i++)
        total += s->prob[i];
    size_t first = 0;
    for (int i = 0; tails && i < n_slices; first += st[i].n_cand, i++)
        total += tail_weight(&st[i], cand, first, last, mx, inv);
    double r = next_unit(s->rng) * total, acc = 0.0;
    for (uint32_t i = 0; i < n; i++) {
        acc += s->prob[i];
        if (r < acc)
            return (bn_pick_t){ .token = s->cand[i].id, .slice = -1 };
    }
    first = 0;
    for (int i = 0; tails && i < n_slices; first += st[i].n_cand, i++) {
        double t = tail_weight(&st[i], cand, first, last, mx, inv);
        if (t > 0.0 && r < acc + t)
            return (bn_pick_t){ .token = -1, .slice = i, .last = last,
                                .target = (r - acc) / exp((double)(st[i].max - mx) * inv) };
        acc += t;
    }
    return (bn_pick_t){ .token = s->cand[n - 1].id, .slice = -1 };
}

int32_t bn_sampler_sample(bn_sampler_t *s, const float *logits)
{
    if (s->p.temp == 0.0f)
        return bn_argmax(logits, s->n_vocab);
    bn_slice_stats_t st;
    bn_sample_slice(&s->p, logits, s->n_vocab, 0, s->slice, &st);
    bn_pick_t pk = bn_sampler_pick(s, &st, 1, s->slice);
    if (pk.token >= 0 || pk.slice < 0)
        return pk.token >= 0 ? pk.token : 0;
    int32_t t = bn_sample_tail(&s->p, logits, s->n_vocab, 0, &st, pk.last, pk.target);
    return t >= 0 ? t : pk.last.id;
}
