/* vocab.h - builds the tokenizer and the chat form from a model file's metadata.
 * Glue between the GGUF reader (worker/gguf.h) and coordinator/tokenizer.h. */
#ifndef BN_VOCAB_H
#define BN_VOCAB_H

#include "coordinator/tokenizer.h"
#include "worker/gguf.h"

/* Tokenizer from tokenizer.ggml.{model, tokens, token_type, merges, pre}. Only the
 * gpt2 (byte-level BPE) model is supported. The tokenizer copies what it keeps,
 * so it may outlive g. */
int bn_vocab_load(const bn_gguf_t *g, bn_tokenizer_t **out, char *err, size_t errlen);

/* The user message wrapped in the model's chat form, as text with special tokens:
 * the LLaMA-3 header form when tokenizer.chat_template uses <|start_header_id|>,
 * else the BitNet 2B4T form "<|begin_of_text|>User: {msg}<|eot_id|>Assistant: ".
 * *out is malloc'd (caller frees), *out_len its length. */
int bn_vocab_chat_wrap(const bn_gguf_t *g, const char *msg, size_t len, char **out, size_t *out_len,
                       char *err, size_t errlen);

#endif
