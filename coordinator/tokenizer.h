/* tokenizer.h - byte-level BPE tokenizer (tokenizer.ggml.model = "gpt2") with the
 * LLaMA-3 pre-tokenizer, and a streaming detokenizer.
 *
 * What it is: text -> token ids and ids -> bytes, as llama.cpp does for LLaMA-3
 * vocabularies (BitNet b1.58 2B4T uses one):
 *   1. special tokens are split out of the text first, longest text first;
 *   2. each remaining fragment is cut into pre-tokens by the LLaMA-3 regex
 *      (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *      ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+   (implemented by hand);
 *   3. a pre-token that is itself a vocabulary entry is emitted whole
 *      ("ignore_merges"); otherwise its bytes are merged pairwise, lowest merge
 *      rank first, leftmost first.
 * Token texts in the vocabulary are byte-encoded with GPT-2's byte-to-unicode map
 * ("Ġ" is the space byte); the tokenizer decodes them once, at construction, and
 * works on raw bytes from then on.
 * What it is not: a SentencePiece tokenizer, a chat template, or llama.cpp's
 * detokenizer space clean-up (" ," -> ","): pieces are raw bytes.
 * Invariants: every byte string round-trips, decode(encode(x)) == x, when the
 * vocabulary has a token for every byte (invalid UTF-8 included: it is not
 * replaced by U+FFFD as llama.cpp does). A bn_tokenizer_t is immutable after
 * bn_tokenizer_new and may be shared by threads without locking.
 */
#ifndef BN_TOKENIZER_H
#define BN_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "worker/gguf.h" /* bn_str_t */

typedef struct bn_tokenizer bn_tokenizer_t;

/* tokenizer.ggml.token_type values (llama.cpp's). Only 3 and 4 matter here: they
 * are "special" tokens, matched as literal text and rendered as their text. Every
 * other type is a normal, byte-encoded token. */
enum {
    BN_TOKEN_NORMAL = 1,
    BN_TOKEN_UNKNOWN = 2,
    BN_TOKEN_CONTROL = 3,      /* <|eot_id|> ...: matched only when parse_special */
    BN_TOKEN_USER_DEFINED = 4, /* matched always, as llama.cpp and HF tokenizers do */
    BN_TOKEN_UNUSED = 5,
    BN_TOKEN_BYTE = 6,
};

/* Everything bn_tokenizer_new reads; the GGUF keys tokenizer.ggml.* as plain
 * arrays, so the tokenizer does not depend on the GGUF reader. The tokenizer
 * copies what it keeps: the strings (often pointers into a mapped file, not
 * NUL-terminated) may go away after bn_tokenizer_new returns. */
typedef struct {
    uint32_t n_vocab;
    const bn_str_t *tokens;     /* (n_vocab) token texts, byte-encoded as in the file */
    const int32_t *token_types; /* (n_vocab) BN_TOKEN_*, or NULL: all normal */
    uint32_t n_merges;
    const bn_str_t *merges;     /* (n_merges) "left right", byte-encoded; rank = index */
    bn_str_t model;             /* tokenizer.ggml.model; ptr NULL: "gpt2" */
    bn_str_t pre;               /* tokenizer.ggml.pre; ptr NULL: absent (= llama3) */
} bn_tokenizer_params_t;

/* Build a tokenizer. Rules for imperfect vocabularies (none is an error):
 *  - duplicate token texts: the first id wins for encoding (bn_tokenizer_find too);
 *  - a merge without a space, whose halves are not tokens, or whose result is not
 *    a token is skipped (it could never apply in a valid vocabulary), counted in
 *    the warning; a repeated merge keeps its first rank;
 *  - a normal token whose text is not GPT-2 byte-encoded is never produced by
 *    encoding; its piece is its text as stored;
 *  - a byte with no token is only an error when text to encode needs it;
 *  - special tokens with empty text are never matched;
 *  - pre: absent, "llama3", "llama-bpe" or "llama-v3" select the LLaMA-3
 *    pre-tokenizer; any other value uses it too, with a warning.
 * Returns BN_OK; BN_EINVAL (NULL or inconsistent arguments), BN_EUNSUPPORTED
 * (model other than "gpt2"), BN_ERANGE (n_vocab 0 or >= 2^31) or BN_ENOMEM, with a
 * message in err. On error *out is NULL. */
int bn_tokenizer_new(const bn_tokenizer_params_t *p, bn_tokenizer_t **out, char *err, size_t errlen);
/* Free; accepts NULL and *t == NULL; sets *t to NULL. */
void bn_tokenizer_destroy(bn_tokenizer_t **t);

/* What the caller should log about the vocabulary (unknown pre-tokenizer, skipped
 * merges, missing byte tokens...), one line; NULL when there is nothing to say.
 * Owned by the tokenizer. */
const char *bn_tokenizer_warning(const bn_tokenizer_t *t);
uint32_t bn_tokenizer_n_vocab(const bn_tokenizer_t *t);
/* 1 when `id` is a CONTROL or USER_DEFINED token, 0 otherwise (out of range too). */
int bn_tokenizer_is_special(const bn_tokenizer_t *t, int32_t id);
/* Length of the longest piece: out of bn_tokenizer_piece this many bytes at most,
 * out of bn_detok_push this plus 3. */
size_t bn_tokenizer_max_piece(const bn_tokenizer_t *t);

/* Encode text[0..len) (any bytes, NUL included; text may be NULL when len is 0).
 * parse_special: match CONTROL tokens written in the text ("<|eot_id|>");
 * USER_DEFINED tokens are matched either way. No BOS is added.
 * On BN_OK, *ids is a malloc'd array of *n_ids ids the caller frees (NULL when
 * *n_ids is 0). Errors: BN_EINVAL (NULL arguments), BN_ERANGE (len >= 2^29),
 * BN_EFORMAT (the text needs a byte the vocabulary has no token for), BN_ENOMEM;
 * then *ids is NULL and *n_ids 0. Thread safe. */
int bn_tokenizer_encode(const bn_tokenizer_t *t, const char *text, size_t len, int parse_special,
                        int32_t **ids, size_t *n_ids, char *err, size_t errlen);

/* Id of the token whose decoded text is the NUL-terminated `text` ("<|eot_id|>",
 * " the"), specials first; -1 when there is none. */
int32_t bn_tokenizer_find(const bn_tokenizer_t *t, const char *text);

/* The bytes of token `id` (GPT-2 byte encoding undone; specials as their text).
 * Returns the piece's length; the bytes are copied to buf only when that length is
 * <= cap (no NUL is added). An out-of-range id gives 0. */
size_t bn_tokenizer_piece(const bn_tokenizer_t *t, int32_t id, char *buf, size_t cap);

/* The LLaMA-3 pre-tokenizer alone, for tests and tools: cuts text[0..len) into
 * pre-tokens and gives the end offset of each in *ends (malloc'd, caller frees;
 * NULL when *n is 0). Returns BN_OK, BN_EINVAL, BN_ERANGE or BN_ENOMEM. */
int bn_tokenizer_pretokenize(const char *text, size_t len, size_t **ends, size_t *n,
                             char *err, size_t errlen);

/* Streaming detokenizer: turns ids into bytes as they are generated, never ending
 * its output in the middle of a UTF-8 character. An incomplete trailing sequence
 * (a lead byte and fewer continuation bytes than it announces, each valid so far)
 * is held back until a later piece completes it; invalid bytes are emitted as they
 * are. Over a whole stream, the bytes emitted by every push plus the final flush
 * equal the concatenated pieces. Start from a zeroed struct: bn_detok_t d = {0};
 * One per stream; the tokenizer may be shared. */
typedef struct {
    unsigned char pend[8];  /* held-back bytes (3 at most) */
    size_t n;
} bn_detok_t;

/* Append the piece of `id` (out of range: nothing) and emit what is complete.
 * Returns the number of bytes to emit, written to out when <= cap; when it is
 * larger, nothing is written and *d is unchanged: call again with a buffer of that
 * size (bn_tokenizer_max_piece(t) + 3 always suffices). */
size_t bn_detok_push(const bn_tokenizer_t *t, bn_detok_t *d, int32_t id, char *out, size_t cap);
/* End of stream: emit the held-back bytes (at most 3) and reset *d. Returns their
 * count; as for push, nothing is written and *d is unchanged when it exceeds cap. */
size_t bn_detok_flush(bn_detok_t *d, char *out, size_t cap);

#endif
