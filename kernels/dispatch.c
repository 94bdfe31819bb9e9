/* dispatch.c - fills the kernel table once at start-up from the CPU's features.
 *
 * Each ISA's table lives in its own file compiled with only its own -m flags
 * (kernels/x86/avx2.c, kernels/x86/avx512.c, kernels/arm/neon.c); this file is
 * compiled for the baseline and only calls into a table after checking the CPU.
 * BN_KERNELS=ref|avx2|avx512|neon forces one. */
#include "kernels/kernels.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const bn_kernels_t ref_table = {
    .name = "ref",
    .quantize_act = bn_ref_quantize_act,
    .tgemm = bn_ref_tgemm,
    .head_quantize = bn_ref_head_quantize,
    .head_gemv = bn_ref_head_gemv,
    .rmsnorm = bn_ref_rmsnorm,
    .rope_neox = bn_ref_rope_neox,
    .attention = bn_ref_attention,
    .attention_heads_f16 = bn_ref_attention_heads_f16,
    .attention_heads_q = bn_ref_attention_heads_q,
    .ffn_act = bn_ref_ffn_act,
    .quantize_scaled = bn_ref_quantize_scaled,
    .to_f16 = bn_ref_to_f16,
};

#if defined(__x86_64__)
extern const bn_kernels_t bn_kernels_avx2, bn_kernels_avx512;

static int cpu_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

static int cpu_avx512(void)
{
    __builtin_cpu_init();
    return cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#endif

#if defined(__aarch64__)
extern const bn_kernels_t bn_kernels_neon;
#endif

const bn_kernels_t *bn_kernels_by_name(const char *name)
{
    if (strcmp(name, "ref") == 0)
        return &ref_table;
#if defined(__x86_64__)
    if (strcmp(name, "avx2") == 0)
        return cpu_avx2() ? &bn_kernels_avx2 : NULL;
    if (strcmp(name, "avx512") == 0)
        return cpu_avx512() ? &bn_kernels_avx512 : NULL;
#endif
#if defined(__aarch64__)
    if (strcmp(name, "neon") == 0)
        return &bn_kernels_neon; /* Advanced SIMD is part of the aarch64 baseline */
#endif
    return NULL;
}

static const bn_kernels_t *chosen;
static char choice[160];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void choose(void)
{
    static const char *const best_first[] = { "avx512", "avx2", "neon", "ref" };
    const char *want = getenv("BN_KERNELS");
    if (want && *want) {
        chosen = bn_kernels_by_name(want);
        if (chosen) {
            snprintf(choice, sizeof choice, "kernels %s (forced by BN_KERNELS)", chosen->name);
            return;
        }
    }
    for (size_t i = 0; !chosen; i++)
        chosen = bn_kernels_by_name(best_first[i]);
    if (want && *want)
        snprintf(choice, sizeof choice, "kernels %s (BN_KERNELS=%.32s is unknown or not supported by this CPU)",
                 chosen->name, want);
    else
        snprintf(choice, sizeof choice, "kernels %s (the best this CPU supports)", chosen->name);
}

const bn_kernels_t *bn_kernels_get(void)
{
    pthread_once(&once, choose);
    return chosen;
}

const char *bn_kernels_choice(void)
{
    pthread_once(&once, choose);
    return choice;
}
