/* kernels.h - the compute kernels: one table of function pointers per operation
 * family, with the plain scalar references in kernels/ref/.
 *
 * What it is: pure compute on caller-owned buffers. No I/O, no MPI, no ZeroMQ, no
 * allocation. Kernels take (ith, nth)-style row ranges [r0, r1) so a thread pool
 * can split work by output rows; they never synchronise themselves.
 * Maths (DESIGN.md section 1): a BitLinear input row is quantized per token with
 * absmax, s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x*s), -128, 127);
 * the output is y = (sum(u*q) - sum(q)) * scale / s with u = w + 1 in {0,1,2}.
 */
#ifndef BN_KERNELS_H
#define BN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* A ternary (or float) weight matrix of the model as the kernels read it:
 * n_out rows of n_in weights, row r at data + r * row_bytes. */
typedef struct {
    uint32_t type;        /* BN_TYPE_I2_S, _TQ2_0, _TQ1_0, or _F16 / _F32 (values w*scale) */
    uint32_t n_in, n_out;
    const uint8_t *data;  /* (n_out, row_bytes) */
    size_t row_bytes;
    float scale;          /* per-tensor scale: I2_S tail scale, else 1; times `.scale` tensor */
} bn_tmat_t;

/* --- reference kernels (kernels/ref/) --- */

/* Per-token absmax int8 quantization of x (n): fills q (n), returns s through *s and
 * sum(q) through *qsum. Exactly the training maths, in float32. */
void bn_ref_quantize_act(const float *x, int n, int8_t *q, float *s, int32_t *qsum);

/* y[r] for r in [r0, r1) of the BitLinear product of w with one quantized token. */
void bn_ref_bitlinear(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum,
                      float *y, int r0, int r1);

/* Dequantize n elements of one row of an embedding-type tensor (F32, F16, BF16,
 * Q8_0, Q4_0, Q6_K) into out. n must be a multiple of the type's block. */
void bn_ref_dequant_row(uint32_t type, const void *row, float *out, int n);

/* logits[r] = dot(row r of E, x) for r in [r0, r1), E of `type` with rows of n. */
void bn_ref_lm_head(uint32_t type, const uint8_t *e, size_t row_bytes, const float *x, int n,
                    float *logits, int r0, int r1);

/* out = x / sqrt(mean(x^2) + eps) * w   (out may equal x) */
void bn_ref_rmsnorm(const float *x, const float *w, int n, float eps, float *out);

/* NEOX RoPE in place on n_heads heads of head_dim at position pos: pairs
 * (i, i + rope_dim/2) for i < rope_dim/2, theta_i = pos * base^(-2i/rope_dim). */
void bn_ref_rope_neox(float *x, int n_heads, int head_dim, int rope_dim, int pos, float base);

/* Causal attention of one query head against n_pos cached positions:
 * out (head_dim) = softmax(q . k_t / sqrt(head_dim)) . v_t, with k_t = k + t*stride.
 * `scratch` holds n_pos floats. */
void bn_ref_attention(const float *q, const float *k, const float *v, size_t stride,
                      int n_pos, int head_dim, float *scratch, float *out);

/* FFN gate: out[i] = act(g[i]) * u[i]; act = relu(x)^2 (relu2 = 1) or silu. */
void bn_ref_ffn_act(const float *g, const float *u, int n, int relu2, float *out);

/* --- the table of chosen kernels --- */
typedef struct {
    const char *name;     /* "ref", "avx2", ... (logged at start) */
    void (*quantize_act)(const float *x, int n, int8_t *q, float *s, int32_t *qsum);
    void (*bitlinear)(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum,
                      float *y, int r0, int r1);
    void (*lm_head)(uint32_t type, const uint8_t *e, size_t row_bytes, const float *x, int n,
                    float *logits, int r0, int r1);
    void (*rmsnorm)(const float *x, const float *w, int n, float eps, float *out);
    void (*rope_neox)(float *x, int n_heads, int head_dim, int rope_dim, int pos, float base);
    void (*attention)(const float *q, const float *k, const float *v, size_t stride,
                      int n_pos, int head_dim, float *scratch, float *out);
    void (*ffn_act)(const float *g, const float *u, int n, int relu2, float *out);
} bn_kernels_t;

/* The kernels for this CPU, chosen once (BN_KERNELS=ref forces the reference).
 * Thread safe after the first call returns; call it once at start-up. */
const bn_kernels_t *bn_kernels_get(void);

#endif
