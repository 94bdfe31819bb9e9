/* avx512.c - the avx512 kernel table (placeholder: reference kernels until written). */
#include "kernels/kernels.h"

const bn_kernels_t bn_kernels_avx512 = {
    .name = "avx512",
    .quantize_act = bn_ref_quantize_act,
    .tgemm = bn_ref_tgemm,
    .head_quantize = bn_ref_head_quantize,
    .head_gemv = bn_ref_head_gemv,
    .rmsnorm = bn_ref_rmsnorm,
    .rope_neox = bn_ref_rope_neox,
    .attention = bn_ref_attention,
    .ffn_act = bn_ref_ffn_act,
};
