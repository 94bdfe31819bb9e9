/* ops.c - scalar references of the float operations of a layer: RMSNorm, NEOX
 * RoPE, causal attention for one head, and the FFN gate activations. */
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

void bn_ref_rope_neox(float *x, int n_heads, int head_dim, int rope_dim, int pos, float base)
{
    int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        /* angle in double: pos * freq loses precision in float at long contexts */
        double theta = (double)pos * pow((double)base, -2.0 * i / rope_dim);
        float c = (float)cos(theta), s = (float)sin(theta);
        for (int h = 0; h < n_heads; h++) {
            float *v = x + (size_t)h * head_dim;
            float a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = a * s + b * c;
        }
    }
}

void bn_ref_attention(const float *q, const float *k, const float *v, size_t stride,
                      int n_pos, int head_dim, float *scratch, float *out)
{
    float scale = 1.0f / sqrtf((float)head_dim);
    float mx = -INFINITY;
    for (int t = 0; t < n_pos; t++) {
        const float *kt = k + (size_t)t * stride;
        float d = 0.0f;
        for (int i = 0; i < head_dim; i++)
            d += q[i] * kt[i];
        scratch[t] = d * scale;
        mx = fmaxf(mx, scratch[t]);
    }
    float sum = 0.0f;
    for (int t = 0; t < n_pos; t++) {
        scratch[t] = expf(scratch[t] - mx);
        sum += scratch[t];
    }
    for (int i = 0; i < head_dim; i++)
        out[i] = 0.0f;
    for (int t = 0; t < n_pos; t++) {
        const float *vt = v + (size_t)t * stride;
        float p = scratch[t] / sum;
        for (int i = 0; i < head_dim; i++)
            out[i] += p * vt[i];
    }
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
