/* ops.c - scalar references of the float operations of a layer: RMSNorm, NEOX
 * RoPE, causal attention for one head (online softmax), the FFN activations. */
#include "kernels/kernels.h"

#include <math.h>

void bn_ref_rmsnorm(const float *x, const float *w, int n, float eps, float *out)
{
    float ss = 0.0f;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++)
        out[i] = x[i] * r * w[i];
}

void bn_ref_rope_table(int pos, int rope_dim, float base, float *cs)
{
    int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        /* the angle in double: pos * freq loses precision in float at long contexts */
        double theta = (double)pos * pow((double)base, -2.0 * i / rope_dim);
        cs[i] = (float)cos(theta);
        cs[half + i] = (float)sin(theta);
    }
}

void bn_ref_rope_neox(float *x, int n_heads, int head_dim, int rope_dim, const float *cs)
{
    int half = rope_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            float c = cs[i], s = cs[half + i], a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = a * s + b * c;
        }
    }
}

/* One score d of the online softmax: on a new maximum *m, what was summed so far
 * (out, n values, and the sum of weights *l) is rescaled; returns d's weight,
 * already added to *l, for the caller to add weight * v_t to out. */
float bn_ref_online_weight(float d, float *m, float *l, float *out, int n)
{
    if (d > *m) { /* a new maximum: rescale what was summed so far */
        float alpha = expf(*m - d);
        for (int i = 0; i < n; i++)
            out[i] *= alpha;
        *l *= alpha;
        *m = d;
    }
    float p = expf(d - *m);
    *l += p;
    return p;
}

void bn_ref_attention(const float *q, const float *k, const float *v, size_t stride, int n_pos,
                      int head_dim, float *out)
{
    float scale = 1.0f / sqrtf((float)head_dim);
    float m = -INFINITY, l = 0.0f;
    for (int i = 0; i < head_dim; i++)
        out[i] = 0.0f;
    for (int t = 0; t < n_pos; t++) {
        const float *kt = k + (size_t)t * stride, *vt = v + (size_t)t * stride;
        float d = 0.0f;
        for (int i = 0; i < head_dim; i++)
            d += q[i] * kt[i];
        float p = bn_ref_online_weight(d * scale, &m, &l, out, head_dim);
        for (int i = 0; i < head_dim; i++)
            out[i] += p * vt[i];
    }
    float inv = 1.0f / l;
    for (int i = 0; i < head_dim; i++)
        out[i] *= inv;
}

void bn_ref_attention_heads_at(const float *q, int nq, size_t q_stride, const void *k, const void *v, int n_pos,
                               int head_dim, float *out, size_t out_stride, float *ml,
                               float (*at)(const void *base, int t, int i, const void *how), const void *how)
{
    float scale = 1.0f / sqrtf((float)head_dim);
    for (int h = 0; h < nq; h++) {
        const float *qh = q + (size_t)h * q_stride;
        float *o = out + (size_t)h * out_stride;
        float m = -INFINITY, l = 0.0f;
        for (int i = 0; i < head_dim; i++)
            o[i] = 0.0f;
        for (int t = 0; t < n_pos; t++) {
            float d = 0.0f;
            for (int i = 0; i < head_dim; i++)
                d += qh[i] * at(k, t, i, how);
            float p = bn_ref_online_weight(d * scale, &m, &l, o, head_dim);
            for (int i = 0; i < head_dim; i++)
                o[i] += p * at(v, t, i, how);
        }
        if (ml) {
            ml[2 * h] = m;
            ml[2 * h + 1] = l;
        }
        float inv = 1.0f / l;
        for (int i = 0; i < head_dim; i++)
            o[i] *= inv;
    }
}

/* element i of row t of an fp16 cache whose rows are *(size_t *)how halves apart */
static float at_f16(const void *base, int t, int i, const void *how)
{
    return bn_fp16_to_f32(((const bn_fp16_t *)base)[(size_t)t * *(const size_t *)how + (size_t)i]);
}

/* bn_ref_attention per head, each cached value widened from fp16 as it is read */
void bn_ref_attention_heads_f16(const float *q, int nq, size_t q_stride, const bn_fp16_t *k, const bn_fp16_t *v,
                                size_t stride, int n_pos, int head_dim, float *out, size_t out_stride, float *ml)
{
    bn_ref_attention_heads_at(q, nq, q_stride, k, v, n_pos, head_dim, out, out_stride, ml, at_f16, &stride);
}

void bn_ref_ffn_act(const float *g, const float *u, int n, int relu2, float *out)
{
    for (int i = 0; i < n; i++) {
        float a;
        if (relu2) {
            float r = g[i] > 0.0f ? g[i] : 0.0f;
            a = r * r;
        } else {
            a = g[i] / (1.0f + expf(-g[i]));
        }
        out[i] = a * u[i];
    }
}

void bn_ref_quantize_scaled(const float *x, const float *g, float r, float s, int n, int8_t *q, int32_t *qsum)
{
    int32_t sum = 0;
    for (int i = 0; i < n; i++) {
        float v = fminf(fmaxf(nearbyintf(x[i] * r * g[i] * s), -128.0f), 127.0f);
        q[i] = (int8_t)v;
        sum += q[i];
    }
    *qsum = sum;
}

void bn_ref_to_f16(const float *x, int n, bn_fp16_t *out)
{
    for (int i = 0; i < n; i++)
        out[i] = bn_f32_to_fp16(x[i]);
}
