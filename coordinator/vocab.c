/* vocab.c - see vocab.h. */
#include "coordinator/vocab.h"

#include "base/status.h"

#include <stdlib.h>
#include <string.h>

int bn_vocab_load(const bn_gguf_t *g, bn_tokenizer_t **out, char *err, size_t errlen)
{
    *out = NULL;
    bn_str_t model;
    int rc = bn_gguf_get_str(g, "tokenizer.ggml.model", &model, err, errlen);
    if (rc)
        return rc;
    if (model.len != 4 || memcmp(model.ptr, "gpt2", 4) != 0)
        return bn_err(err, errlen, BN_EUNSUPPORTED, "%s: tokenizer model '%.*s' (only gpt2 byte-level BPE is supported)",
                      g->path, (int)(model.len > 32 ? 32 : model.len), model.ptr);
    const bn_gguf_kv_t *toks = bn_gguf_find(g, "tokenizer.ggml.tokens");
    const bn_gguf_kv_t *merges = bn_gguf_find(g, "tokenizer.ggml.merges");
    const bn_gguf_kv_t *types = bn_gguf_find(g, "tokenizer.ggml.token_type");
    if (!toks || toks->type != BN_GGUF_ARRAY || toks->arr_type != BN_GGUF_STRING || toks->n == 0 ||
        toks->n > INT32_MAX)
        return bn_err(err, errlen, BN_EFORMAT, "%s: key 'tokenizer.ggml.tokens' missing or not an array of strings", g->path);
    if (!merges || merges->type != BN_GGUF_ARRAY || merges->arr_type != BN_GGUF_STRING || merges->n > INT32_MAX)
        return bn_err(err, errlen, BN_EFORMAT, "%s: key 'tokenizer.ggml.merges' missing or not an array of strings", g->path);
    int32_t *tt = NULL;
    if (types) {
        if (types->type != BN_GGUF_ARRAY || types->n != toks->n ||
            !(types->arr_type == BN_GGUF_INT32 || types->arr_type == BN_GGUF_UINT32))
            return bn_err(err, errlen, BN_EFORMAT, "%s: key 'tokenizer.ggml.token_type' must hold %llu integers",
                          g->path, (unsigned long long)toks->n);
        tt = malloc(toks->n * sizeof *tt);
        if (!tt)
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        for (uint64_t i = 0; i < toks->n; i++)
            tt[i] = (int32_t)bn_gguf_arr_int(types, i);
    }
    bn_str_t pre = { NULL, 0 };
    if (bn_gguf_get_str(g, "tokenizer.ggml.pre", &pre, NULL, 0) != BN_OK)
        pre.ptr = NULL;
    bn_tokenizer_params_t tp = {
        .n_vocab = (uint32_t)toks->n,
        .tokens = toks->strs,
        .token_types = tt,
        .n_merges = (uint32_t)merges->n,
        .merges = merges->strs,
        .model = model,
        .pre = pre,
    };
    rc = bn_tokenizer_new(&tp, out, err, errlen);
    free(tt);
    return rc;
}

int bn_vocab_chat_wrap(const bn_gguf_t *g, const char *msg, size_t len, char **out, size_t *out_len,
                       char *err, size_t errlen)
{
    static const char *const llama3[2] = {
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    };
    static const char *const b2b4t[2] = { "<|begin_of_text|>User: ", "<|eot_id|>Assistant: " };
    const char *const *form = b2b4t;
    bn_str_t tmpl;
    if (bn_gguf_get_str(g, "tokenizer.chat_template", &tmpl, NULL, 0) == BN_OK &&
        memmem(tmpl.ptr, tmpl.len, "<|start_header_id|>", 19))
        form = llama3;
    size_t a = strlen(form[0]), b = strlen(form[1]);
    char *s = malloc(a + len + b + 1);
    if (!s)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    memcpy(s, form[0], a);
    memcpy(s + a, msg, len);
    memcpy(s + a + len, form[1], b);
    s[a + len + b] = 0;
    *out = s;
    *out_len = a + len + b;
    return BN_OK;
}
