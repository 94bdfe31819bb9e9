/* model.h - a BitNet b1.58 model as read from a GGUF file: hyper-parameters
 * (bn_config_t) and weights (bn_weights_t). Run state is in forward.h.
 *
 * What it is: bn_model_load() maps the file, reads every hyper-parameter from its
 * metadata (never from constants), finds every tensor and checks its type and
 * shape against the hyper-parameters. The matrices every token streams (the
 * ternary weights and the LM head) are read into anonymous memory backed by
 * transparent huge pages, and their file pages let go; the input embedding stays
 * in the mapping. What it is not: the tokenizer (coordinator/tokenizer.h, built from the
 * same file by bn_model_tokenizer()) or the compute. */
#ifndef BN_MODEL_H
#define BN_MODEL_H

#include "kernels/kernels.h"
#include "kernels/pool.h"
#include "worker/shard.h"
#include "worker/gguf.h"

#include <stddef.h>
#include <stdint.h>

typedef enum { BN_FFN_RELU2 = 0, BN_FFN_SILU = 1 } bn_ffn_act_t;

typedef struct {
    char arch[32];          /* general.architecture */
    uint32_t n_vocab;
    uint32_t n_ctx_train;   /* <arch>.context_length */
    uint32_t n_embd;        /* hidden width */
    uint32_t n_layer;
    uint32_t n_ff;
    uint32_t n_head, n_head_kv, head_dim, rope_dim;
    float rope_base, norm_eps;
    bn_ffn_act_t ffn_act;
    int32_t bos_id, eos_id, eot_id; /* -1 when absent */
    int add_bos;
} bn_config_t;

typedef struct {
    const float *attn_norm;      /* (n_embd) */
    bn_tmat_t wq;                /* (n_head*head_dim, n_embd) */
    bn_tmat_t wk, wv;            /* (n_head_kv*head_dim, n_embd) */
    const float *attn_sub_norm;  /* (n_head*head_dim) */
    bn_tmat_t wo;                /* (n_embd, n_head*head_dim) */
    const float *ffn_norm;       /* (n_embd) */
    bn_tmat_t w_gate, w_up;      /* (n_ff, n_embd) */
    const float *ffn_sub_norm;   /* (n_ff) */
    bn_tmat_t w_down;            /* (n_embd, n_ff) */
} bn_layer_t;

typedef struct {
    uint32_t embd_type;          /* BN_TYPE_* of token_embd */
    const uint8_t *token_embd;   /* (n_vocab, embd_row_bytes) in the mapping: input rows */
    size_t embd_row_bytes;
    bn_hmat_t head;              /* (n_vocab, n_embd) the tied LM head, in --lm-head format */
    const float *output_norm;    /* (n_embd) */
    bn_layer_t *layers;          /* (n_layer) */
    uint32_t wtype;              /* BN_TYPE_* of the file's ternary tensors (of attn_q) */
} bn_weights_t;

typedef struct {
    bn_gguf_t *gguf;             /* owns the mapping */
    bn_config_t cfg;
    bn_weights_t w;
    bn_shard_t shard;            /* the part of the model held here (all of it for one rank):
                                    layers outside [layer0, layer1) are left empty; wq rows,
                                    wo columns are heads [head0, head1), wk/wv rows KV heads
                                    [kv0, kv1), gate/up rows and down columns [ff0, ff1), the
                                    LM head rows [vocab0, vocab1) */
    void **owned;                /* (n_owned) small malloc'd copies (norms) */
    size_t n_owned;
    struct bn_chunk *chunks;     /* (n_chunks) the weight arena: see weights_alloc in model.c */
    size_t n_chunks;
    bn_pool_t *load_pool;        /* while loading: the threads that copy and convert */
} bn_model_t;

/* How to load: the LM head format, and threads for converting it. */
typedef struct {
    int head_type;               /* bn_head_type_t, or -1 for the default */
    bn_pool_t *pool;             /* may be NULL: one thread */
    const bn_shard_t *shard;     /* NULL: the whole model */
} bn_model_opts_t;

/* The default LM head format, chosen from the measurements in bench/RESULTS.md
 * (q6: 40% of f16's bytes per token, logits within 0.1 of f16 on the fixtures), and the names of the formats ("f16", "q8", "q6", "q4"). */
#define BN_HEAD_DEFAULT BN_HEAD_Q6
const char *bn_head_type_name(int t);
/* Bytes of one LM head row of n_in values (a multiple of 32) in format `type`. */
size_t bn_head_row_bytes(int type, uint32_t n_in);
int bn_head_type_parse(const char *s); /* -1 when unknown */

/* Load and validate a model file: ternary tensors are repacked into the kernels'
 * layout (I2_S rows copied as they are), the LM head built in its format. opts may be NULL.
 * Returns BN_OK or a status with a one-line message naming the file and the key or
 * tensor at fault. */
int bn_model_load(const char *path, const bn_model_opts_t *opts, bn_model_t **out, char *err, size_t errlen);
void bn_model_destroy(bn_model_t **m);
/* The hyper-parameters only (for the planner, before loading a shard). */
int bn_model_peek(const char *path, bn_config_t *cfg, char *err, size_t errlen);

/* Bytes of weights a decoder reads per generated token: every ternary matrix in the
 * kernels' layout plus the whole LM head (the input embedding row is negligible). */
uint64_t bn_model_bytes_per_token(const bn_model_t *m);

/* Embedding row of `token` dequantized to n_embd floats. token must be < n_vocab. */
void bn_model_embed(const bn_model_t *m, int32_t token, float *out);

#endif
