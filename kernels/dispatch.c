/* dispatch.c - fills the kernel table once at start-up. Today only the scalar
 * reference exists; SIMD variants chosen from CPUID join here (issue 3).
 * BN_KERNELS=ref forces the reference. */
#include "kernels/kernels.h"

static const bn_kernels_t ref_table = {
    .name = "ref",
    .quantize_act = bn_ref_quantize_act,
    .bitlinear = bn_ref_bitlinear,
    .lm_head = bn_ref_lm_head,
    .rmsnorm = bn_ref_rmsnorm,
    .rope_neox = bn_ref_rope_neox,
    .attention = bn_ref_attention,
    .ffn_act = bn_ref_ffn_act,
};

const bn_kernels_t *bn_kernels_get(void)
{
    return &ref_table;
}
