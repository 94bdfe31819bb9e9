/* slice.c - a vocabulary slice's candidates and tail draws; see slice.h. */
#include "worker/slice.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int32_t bn_argmax(const float *logits, uint32_t n)
{
    int32_t best = 0;
    for (uint32_t i = 1; i < n; i++)
        if (logits[i] > logits[best])
            best = (int32_t)i;
    return best;
}

/* descending by logit, ascending id on ties: a total order, so qsort is deterministic */
int bn_cand_cmp(const void *a, const void *b)
{
    const bn_cand_t *x = a, *y = b;
    return bn_cand_worse(*x, *y) ? 1 : bn_cand_worse(*y, *x) ? -1 : 0;
}

uint32_t bn_sampler_n_cand(const bn_sampler_params_t *p, uint32_t n)
{
    uint32_t k = p->temp == 0.0f ? 1 : BN_SAMPLER_CAP;
    if (p->top_k > 0 && (uint32_t)p->top_k < k)
        k = (uint32_t)p->top_k;
    return k < n ? k : n;
}

/* the root h[0] is the worst of the k kept */
static void sift_down(bn_cand_t *h, uint32_t k, uint32_t i)
{
    for (;;) {
        uint32_t l = 2 * i + 1, m = i;
        if (l < k && bn_cand_worse(h[l], h[m]))
            m = l;
        if (l + 1 < k && bn_cand_worse(h[l + 1], h[m]))
            m = l + 1;
        if (m == i)
            return;
        bn_cand_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

void bn_sample_slice(const bn_sampler_params_t *p, const float *logits, uint32_t n, int32_t off,
                     bn_cand_t *cand, bn_slice_stats_t *st)
{
    const uint32_t k = bn_sampler_n_cand(p, n);
    memset(st, 0, sizeof *st);
    st->n_cand = k;
    st->max = -INFINITY;
    if (k == 0)
        return;
    /* a min-heap of the k best: one comparison per token once it is full */
    for (uint32_t i = 0; i < k; i++)
        cand[i] = (bn_cand_t){ logits[i], off + (int32_t)i };
    for (uint32_t i = k / 2; i-- > 0;)
        sift_down(cand, k, i);
    for (uint32_t i = k; i < n; i++) {
        bn_cand_t c = { logits[i], off + (int32_t)i };
        if (bn_cand_worse(cand[0], c)) {
            cand[0] = c;
            sift_down(cand, k, 0);
        }
    }
    qsort(cand, k, sizeof *cand, bn_cand_cmp);
    st->max = cand[0].logit;
    if (p->temp > 0.0f && p->top_k == 0) {
        const float inv = 1.0f / p->temp;
        double sum = 0.0;
        for (uint32_t i = 0; i < n; i++)
            sum += expf((logits[i] - st->max) * inv);
        st->sumexp = sum;
    }
}

int32_t bn_sample_tail(const bn_sampler_params_t *p, const float *logits, uint32_t n, int32_t off,
                       const bn_slice_stats_t *st, bn_cand_t last, double target)
{
    const float inv = 1.0f / p->temp;
    double acc = 0.0;
    int32_t pick = -1;
    for (uint32_t i = 0; i < n; i++) {
        bn_cand_t c = { logits[i], off + (int32_t)i };
        if (!bn_cand_worse(c, last))
            continue; /* a kept candidate */
        pick = c.id;
        acc += expf((c.logit - st->max) * inv);
        if (target < acc)
            break;
    }
    return pick;
}
