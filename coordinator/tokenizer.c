/* tokenizer.c - byte-level BPE with the LLaMA-3 pre-tokenizer (see tokenizer.h).
 *
 * What it is: construction (decode the byte-encoded vocabulary, build the hash
 * tables), encoding (special tokens, pre-tokens, BPE) and decoding (pieces, the
 * streaming detokenizer). What it is not: a general regex engine; the one regex
 * it needs is written out as code in pretok_next().
 * Invariants: after bn_tokenizer_new nothing in bn_tokenizer_t changes, so every
 * function taking a const bn_tokenizer_t * is thread safe; encoding state lives
 * on the caller's stack and heap. All tables are keyed by raw bytes (GPT-2 byte
 * encoding undone), so BPE symbols are token ids, never strings.
 */
#include "coordinator/tokenizer.h"

#include "coordinator/unicode.h"
#include "base/status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Texts longer than this are refused: keeps every symbol index in an int32. */
#define MAX_TEXT ((size_t)1 << 29)

/* How a token is treated, from its token_type and whether its text decodes. */
enum {
    KIND_NORMAL,  /* byte-encoded text, decoded; in the text -> id table */
    KIND_RAW,     /* "normal" but not GPT-2 byte-encoded: never produced by encode */
    KIND_CONTROL, /* special: matched only with parse_special */
    KIND_USER,    /* special: always matched */
};

/* A node of the trie of special-token texts: finding every special that starts at
 * a position costs the length of the longest one that matches there, not the
 * number of specials (text full of "<|" must not be slow). */
typedef struct {
    int32_t child;       /* first child, -1 when none */
    int32_t sibling;     /* next child of the same parent, -1 when none */
    int32_t prio[2];     /* the first special whose text ends here (index in specials),
                          * [0] among USER_DEFINED ones, [1] among all; -1 when none */
    unsigned char byte;  /* the byte leading here from the parent */
} trie_node_t;

typedef struct {
    uint64_t key;   /* (left id << 32) | right id; EMPTY_KEY when the slot is free */
    uint32_t rank;  /* index in tokenizer.ggml.merges: lower merges first */
    int32_t id;     /* the merged token */
} merge_slot_t;
#define EMPTY_KEY UINT64_MAX

struct bn_tokenizer {
    uint32_t n_vocab;
    char *bytes;              /* every piece, concatenated */
    size_t *off;              /* (n_vocab + 1) piece i = bytes[off[i] .. off[i+1]) */
    unsigned char *kind;      /* (n_vocab) KIND_* */
    int32_t *table;           /* (table_mask + 1) open addressing: piece -> id, -1 free */
    size_t table_mask;
    merge_slot_t *merges;     /* (merges_mask + 1) open addressing: pair -> merge */
    size_t merges_mask;
    int32_t byte_id[256];     /* token of each single byte, -1 when the vocab has none */
    int32_t *specials;        /* (n_specials) ids by priority: longer text first, then id */
    uint32_t n_specials;
    trie_node_t *trie;        /* (n_trie) node 0 is the root (the empty text) */
    uint32_t n_trie;
    int32_t root_child[256];  /* the root's children, directly by byte; -1 when none */
    size_t max_piece;
    char warning[320];
};

/* ---- UTF-8 and the GPT-2 byte encoding ---------------------------------- */

/* Sequence length announced by lead byte b (0: b cannot start a sequence) and the
 * range allowed for the second byte, which excludes overlongs, surrogates and code
 * points above U+10FFFF. */
static size_t utf8_lead(unsigned char b, unsigned char *lo, unsigned char *hi)
{
    *lo = 0x80;
    *hi = 0xBF;
    if (b < 0x80)
        return 1;
    if (b < 0xC2)
        return 0;
    if (b < 0xE0)
        return 2;
    if (b < 0xF0) {
        if (b == 0xE0)
            *lo = 0xA0;
        else if (b == 0xED)
            *hi = 0x9F;
        return 3;
    }
    if (b < 0xF5) {
        if (b == 0xF0)
            *lo = 0x90;
        else if (b == 0xF4)
            *hi = 0x8F;
        return 4;
    }
    return 0;
}

static int is_cont(unsigned char b) { return (b & 0xC0) == 0x80; }

/* Decode the well-formed sequence at s[0..n), n >= 1: its length, or 0 when the
 * bytes are not valid UTF-8 there. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char lo, hi;
    size_t len = utf8_lead(s[0], &lo, &hi);
    if (len == 0 || len > n)
        return 0;
    if (len == 1) {
        *cp = s[0];
        return 1;
    }
    if (s[1] < lo || s[1] > hi)
        return 0;
    uint32_t c = s[0] & (0x7Fu >> len);
    for (size_t k = 1; k < len; k++) {
        if (!is_cont(s[k]))
            return 0;
        c = (c << 6) | (s[k] & 0x3Fu);
    }
    *cp = c;
    return len;
}

/* GPT-2's byte-to-unicode map, inverted: the byte a code point of a token text
 * stands for, or -1. Printable bytes ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) stand for
 * themselves; the other 68 bytes, in increasing order, were given U+0100.. . */
static int gpt2_byte(uint32_t cp)
{
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF))
        return (int)cp;
    if (cp >= 0x100 && cp < 0x100 + 68) {
        uint32_t n = cp - 0x100;
        if (n < 33)
            return (int)n;                /* 0x00 .. 0x20 */
        if (n < 67)
            return (int)(0x7F + n - 33);  /* 0x7F .. 0xA0 */
        return 0xAD;
    }
    return -1;
}

/* Undo the byte encoding of s[0..n) into out (room for n bytes: each byte takes at
 * least one byte encoded). Returns the decoded length, or -1 when s is not a
 * byte-encoded string. */
static long gpt2_decode(const char *s, size_t n, char *out)
{
    const unsigned char *u = (const unsigned char *)s;
    long k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = utf8_decode(u + i, n - i, &cp);
        int b = len ? gpt2_byte(cp) : -1;
        if (b < 0)
            return -1;
        out[k++] = (char)b;
        i += len;
    }
    return k;
}

/* ---- the LLaMA-3 pre-tokenizer ------------------------------------------- */

typedef struct {
    unsigned char cls;   /* BN_UCLASS_* */
    unsigned char ascii; /* the byte when the character is ASCII, else 0 */
    unsigned char len;   /* bytes */
} uchar_t;

/* The character at s[off], off < n. A byte that does not start valid UTF-8 is a
 * character of its own, of class OTHER (U+FFFD, which llama.cpp substitutes,
 * is a symbol too, so the cuts are the same). */
static uchar_t char_at(const unsigned char *s, size_t n, size_t off)
{
    uchar_t u;
    uint32_t cp;
    if (s[off] < 0x80) {
        u.cls = (unsigned char)bn_unicode_class(s[off]);
        u.ascii = s[off];
        u.len = 1;
        return u;
    }
    size_t len = utf8_decode(s + off, n - off, &cp);
    u.ascii = 0;
    u.cls = len ? (unsigned char)bn_unicode_class(cp) : BN_UCLASS_OTHER;
    u.len = len ? (unsigned char)len : 1;
    return u;
}

static int is_crlf(unsigned char c) { return c == '\r' || c == '\n'; }
static unsigned char lower(unsigned char c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* End of the pre-token that starts at s[off] (off < n): the first alternative of
 * the regex that matches at off, as a backtracking engine would choose it. */
static size_t pretok_next(const unsigned char *s, size_t n, size_t off)
{
    const uchar_t a = char_at(s, n, off);
    size_t j;
    uchar_t u;

    /* (?i:'s|'t|'re|'ve|'m|'ll|'d). Case-insensitive matching folds one non-ASCII
     * character onto these letters: U+017F (long s, C5 BF) onto s. A regex engine
     * (and HF tokenizers) match "'\u017f"; llama.cpp, which compares lowercase
     * code points, does not. We follow the regex. */
    if (a.ascii == '\'' && off + 1 < n) {
        unsigned char c1 = lower(s[off + 1]);
        if (s[off + 1] == 0xC5 && off + 2 < n && s[off + 2] == 0xBF)
            return off + 3;
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')
            return off + 2;
        if (off + 2 < n) {
            unsigned char c2 = lower(s[off + 2]);
            if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
                return off + 3;
        }
    }

    /* [^\r\n\p{L}\p{N}]?\p{L}+ : one optional non-letter prefix, then letters. */
    if (!is_crlf(a.ascii) && a.cls != BN_UCLASS_NUMBER) {
        j = off + a.len;
        if (a.cls == BN_UCLASS_LETTER || (j < n && char_at(s, n, j).cls == BN_UCLASS_LETTER)) {
            while (j < n && (u = char_at(s, n, j)).cls == BN_UCLASS_LETTER)
                j += u.len;
            return j;
        }
    }

    /* \p{N}{1,3} */
    if (a.cls == BN_UCLASS_NUMBER) {
        j = off;
        for (int k = 0; k < 3 && j < n && (u = char_at(s, n, j)).cls == BN_UCLASS_NUMBER; k++)
            j += u.len;
        return j;
    }

    /* ' '?[^\s\p{L}\p{N}]+[\r\n]* */
    j = off + (a.ascii == ' ');
    if (j < n && char_at(s, n, j).cls == BN_UCLASS_OTHER) {
        while (j < n && (u = char_at(s, n, j)).cls == BN_UCLASS_OTHER)
            j += u.len;
        while (j < n && is_crlf(s[j]))
            j++;
        return j;
    }

    /* The three whitespace alternatives look at the whole run of whitespace. */
    size_t count = 0, last_start = off, after_crlf = 0;
    j = off;
    while (j < n && (u = char_at(s, n, j)).cls == BN_UCLASS_SPACE) {
        last_start = j;
        if (is_crlf(u.ascii))
            after_crlf = j + 1;
        j += u.len;
        count++;
    }
    /* \s*[\r\n]+ : \s* backtracks to the last \r or \n of the run, which ends the
     * match ([\r\n]+ cannot go on: what follows it in the run is not \r or \n). */
    if (after_crlf)
        return after_crlf;
    /* \s+(?!\S) : at the end of the text the whole run; before a non-space it
     * backtracks by one character, so the last space goes with the next word. */
    if (count > 1 && j < n)
        return last_start;
    /* \s+ : a single space before a non-space, or a run at the end. */
    if (count > 0)
        return j;
    /* Unreachable (every class is covered above); never loop forever. */
    return off + a.len;
}

int bn_tokenizer_pretokenize(const char *text, size_t len, size_t **ends, size_t *n,
                             char *err, size_t errlen)
{
    if (!ends || !n || (!text && len))
        return bn_err(err, errlen, BN_EINVAL, "tokenizer: pretokenize: NULL argument");
    *ends = NULL;
    *n = 0;
    if (len >= MAX_TEXT)
        return bn_err(err, errlen, BN_ERANGE, "tokenizer: text of %zu bytes is too long", len);
    size_t cap = 0, k = 0;
    size_t *v = NULL;
    for (size_t off = 0; off < len;) {
        off = pretok_next((const unsigned char *)text, len, off);
        if (k == cap) {
            cap = cap ? 2 * cap : 64;
            size_t *nv = realloc(v, cap * sizeof *v);
            if (!nv) {
                free(v);
                return bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory");
            }
            v = nv;
        }
        v[k++] = off;
    }
    *ends = v;
    *n = k;
    return BN_OK;
}

/* ---- hash tables ---------------------------------------------------------- */

static uint64_t hash_bytes(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325u; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 0x100000001b3u;
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 31;
    x *= 0x7fb5d329728ea185u;
    x ^= x >> 27;
    x *= 0x81dadef4bc2dd44du;
    return x ^ (x >> 33);
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n)
        c *= 2;
    return c;
}

static const char *piece_ptr(const bn_tokenizer_t *t, int32_t id, size_t *len)
{
    *len = t->off[id + 1] - t->off[id];
    return t->bytes + t->off[id];
}

/* Id of the normal token whose piece is s[0..n), or -1. */
static int32_t table_find(const bn_tokenizer_t *t, const void *s, size_t n)
{
    for (size_t i = hash_bytes(s, n) & t->table_mask;; i = (i + 1) & t->table_mask) {
        int32_t id = t->table[i];
        if (id < 0)
            return -1;
        size_t len;
        const char *p = piece_ptr(t, id, &len);
        if (len == n && memcmp(p, s, n) == 0)
            return id;
    }
}

/* Insert `id` unless its piece is there already (the first id wins). */
static void table_insert(bn_tokenizer_t *t, int32_t id)
{
    size_t n;
    const char *s = piece_ptr(t, id, &n);
    for (size_t i = hash_bytes(s, n) & t->table_mask;; i = (i + 1) & t->table_mask) {
        int32_t other = t->table[i];
        if (other < 0) {
            t->table[i] = id;
            return;
        }
        size_t len;
        const char *p = piece_ptr(t, other, &len);
        if (len == n && memcmp(p, s, n) == 0)
            return;
    }
}

static uint64_t pair_key(int32_t l, int32_t r) { return ((uint64_t)(uint32_t)l << 32) | (uint32_t)r; }

static const merge_slot_t *merge_find(const bn_tokenizer_t *t, int32_t l, int32_t r)
{
    uint64_t key = pair_key(l, r);
    for (size_t i = hash_u64(key) & t->merges_mask;; i = (i + 1) & t->merges_mask) {
        const merge_slot_t *m = &t->merges[i];
        if (m->key == key)
            return m;
        if (m->key == EMPTY_KEY)
            return NULL;
    }
}

/* Insert unless the pair is there already (the first, lowest rank wins). */
static void merge_insert(bn_tokenizer_t *t, int32_t l, int32_t r, uint32_t rank, int32_t id)
{
    uint64_t key = pair_key(l, r);
    for (size_t i = hash_u64(key) & t->merges_mask;; i = (i + 1) & t->merges_mask) {
        merge_slot_t *m = &t->merges[i];
        if (m->key == key)
            return;
        if (m->key == EMPTY_KEY) {
            m->key = key;
            m->rank = rank;
            m->id = id;
            return;
        }
    }
}

/* ---- construction ---------------------------------------------------------- */

static int str_is(bn_str_t s, const char *lit)
{
    size_t n = strlen(lit);
    return s.len == n && memcmp(s.ptr, lit, n) == 0;
}

typedef struct {
    size_t len;
    int32_t id;
} special_key_t;

/* Priority: longer text first (as llama.cpp matches them), then lower id, so that
 * ties do not depend on the sort. */
static int cmp_special(const void *a, const void *b)
{
    const special_key_t *x = a, *y = b;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Order the specials by priority, then build their trie. BN_OK or BN_ENOMEM. */
static int index_specials(bn_tokenizer_t *t)
{
    special_key_t *keys = malloc((t->n_specials + 1) * sizeof *keys);
    if (!keys)
        return BN_ENOMEM;
    for (uint32_t k = 0; k < t->n_specials; k++)
        keys[k] = (special_key_t){ t->off[t->specials[k] + 1] - t->off[t->specials[k]], t->specials[k] };
    qsort(keys, t->n_specials, sizeof *keys, cmp_special);
    for (uint32_t k = 0; k < t->n_specials; k++)
        t->specials[k] = keys[k].id;
    free(keys);
    /* The trie: a node per distinct prefix. Inserted in priority order, so a
     * text given to two specials keeps the first. */
    size_t n_nodes = 1;
    for (uint32_t k = 0; k < t->n_specials; k++)
        n_nodes += t->off[t->specials[k] + 1] - t->off[t->specials[k]];
    t->trie = n_nodes <= INT32_MAX ? malloc(n_nodes * sizeof *t->trie) : NULL;
    if (!t->trie)
        return BN_ENOMEM;
    t->trie[0] = (trie_node_t){ -1, -1, { -1, -1 }, 0 };
    t->n_trie = 1;
    for (int b = 0; b < 256; b++)
        t->root_child[b] = -1;
    for (uint32_t k = 0; k < t->n_specials; k++) {
        size_t len;
        const unsigned char *text = (const unsigned char *)piece_ptr(t, t->specials[k], &len);
        int32_t node = 0;
        for (size_t i = 0; i < len; i++) {
            int32_t *link = node == 0 ? &t->root_child[text[i]] : &t->trie[node].child;
            int32_t c = *link;
            while (c >= 0 && t->trie[c].byte != text[i])
                c = t->trie[c].sibling;
            if (c < 0) {
                c = (int32_t)t->n_trie++;
                t->trie[c] = (trie_node_t){ -1, node == 0 ? -1 : *link, { -1, -1 }, text[i] };
                *link = c;
            }
            node = c;
        }
        /* Two specials may share a text: without parse_special the first
         * USER_DEFINED one of them must still match. */
        if (t->trie[node].prio[1] < 0)
            t->trie[node].prio[1] = (int32_t)k;
        if (t->trie[node].prio[0] < 0 && t->kind[t->specials[k]] == KIND_USER)
            t->trie[node].prio[0] = (int32_t)k;
    }
    return BN_OK;
}

/* Split "left right" at its first space after the first byte (a byte-encoded text
 * has no space of its own: the space byte is "Ġ"), decode both halves and look
 * them and their concatenation up. 0 when the merge cannot apply. */
static int parse_merge(const bn_tokenizer_t *t, bn_str_t m, char *buf,
                       int32_t *l, int32_t *r, int32_t *res)
{
    if (!m.ptr || m.len < 3)
        return 0;
    const char *sp = memchr(m.ptr + 1, ' ', m.len - 1);
    if (!sp)
        return 0;
    size_t nl = (size_t)(sp - m.ptr), nr = m.len - nl - 1;
    long dl = gpt2_decode(m.ptr, nl, buf);
    long dr = dl < 0 ? -1 : gpt2_decode(sp + 1, nr, buf + dl);
    if (dl <= 0 || dr <= 0)
        return 0;
    *l = table_find(t, buf, (size_t)dl);
    *r = table_find(t, buf + dl, (size_t)dr);
    *res = table_find(t, buf, (size_t)(dl + dr));
    return *l >= 0 && *r >= 0 && *res >= 0;
}

int bn_tokenizer_new(const bn_tokenizer_params_t *p, bn_tokenizer_t **out, char *err, size_t errlen)
{
    if (out)
        *out = NULL;
    if (!p || !out || !p->tokens || (p->n_merges && !p->merges))
        return bn_err(err, errlen, BN_EINVAL, "tokenizer: NULL argument");
    if (p->n_vocab == 0 || p->n_vocab >= (uint32_t)INT32_MAX)
        return bn_err(err, errlen, BN_ERANGE, "tokenizer: vocabulary size %u out of range", p->n_vocab);
    if (p->model.ptr && !str_is(p->model, "gpt2"))
        return bn_err(err, errlen, BN_EUNSUPPORTED,
                      "tokenizer: tokenizer.ggml.model '%.*s' is not supported (only gpt2)",
                      (int)(p->model.len > 64 ? 64 : p->model.len), p->model.ptr);
    uint64_t total = 0, longest_merge = 0;
    for (uint32_t i = 0; i < p->n_vocab; i++) {
        if (!p->tokens[i].ptr && p->tokens[i].len)
            return bn_err(err, errlen, BN_EINVAL, "tokenizer: token %u has no text", i);
        total += p->tokens[i].len;
    }
    for (uint32_t i = 0; i < p->n_merges; i++)
        if (p->merges[i].len > longest_merge)
            longest_merge = p->merges[i].len;
    if (total > SIZE_MAX / 4 || longest_merge > SIZE_MAX / 4)
        return bn_err(err, errlen, BN_ERANGE, "tokenizer: token texts too long");

    bn_tokenizer_t *t = calloc(1, sizeof *t);
    if (!t)
        return bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory");
    t->n_vocab = p->n_vocab;
    t->table_mask = pow2_at_least(2 * (size_t)p->n_vocab) - 1;
    t->merges_mask = pow2_at_least(2 * (size_t)p->n_merges) - 1;
    t->bytes = malloc(total ? total : 1);
    t->off = malloc((p->n_vocab + 1) * sizeof *t->off);
    t->kind = malloc(p->n_vocab);
    t->table = malloc((t->table_mask + 1) * sizeof *t->table);
    t->merges = malloc((t->merges_mask + 1) * sizeof *t->merges);
    t->specials = malloc(p->n_vocab * sizeof *t->specials);
    char *buf = malloc(longest_merge + 1);
    if (!t->bytes || !t->off || !t->kind || !t->table || !t->merges || !t->specials || !buf) {
        free(buf);
        bn_tokenizer_destroy(&t);
        return bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory for %u tokens, %u merges",
                      p->n_vocab, p->n_merges);
    }
    memset(t->table, 0xff, (t->table_mask + 1) * sizeof *t->table);
    for (size_t i = 0; i <= t->merges_mask; i++)
        t->merges[i].key = EMPTY_KEY;

    /* Pieces: specials as written, normal tokens with the byte encoding undone. */
    uint32_t n_raw = 0;
    size_t k = 0;
    for (uint32_t i = 0; i < p->n_vocab; i++) {
        bn_str_t s = p->tokens[i];
        int type = p->token_types ? p->token_types[i] : BN_TOKEN_NORMAL;
        long d = -1;
        t->off[i] = k;
        if (type == BN_TOKEN_CONTROL || type == BN_TOKEN_USER_DEFINED) {
            t->kind[i] = type == BN_TOKEN_CONTROL ? KIND_CONTROL : KIND_USER;
            if (s.len)
                t->specials[t->n_specials++] = (int32_t)i;
        } else {
            d = s.len ? gpt2_decode(s.ptr, s.len, t->bytes + k) : 0;
            t->kind[i] = d >= 0 ? KIND_NORMAL : KIND_RAW;
            n_raw += d < 0;
        }
        if (d >= 0) {
            k += (size_t)d;
        } else {
            if (s.len)
                memcpy(t->bytes + k, s.ptr, s.len);
            k += s.len;
        }
        if (k - t->off[i] > t->max_piece)
            t->max_piece = k - t->off[i];
    }
    t->off[p->n_vocab] = k;
    for (uint32_t i = 0; i < p->n_vocab; i++)
        if (t->kind[i] == KIND_NORMAL)
            table_insert(t, (int32_t)i);
    int n_missing = 0;
    for (int b = 0; b < 256; b++) {
        unsigned char c = (unsigned char)b;
        t->byte_id[b] = table_find(t, &c, 1);
        n_missing += t->byte_id[b] < 0;
    }
    uint32_t n_skipped = 0;
    for (uint32_t i = 0; i < p->n_merges; i++) {
        int32_t l, r, res;
        if (parse_merge(t, p->merges[i], buf, &l, &r, &res))
            merge_insert(t, l, r, i, res);
        else
            n_skipped++;
    }
    free(buf);
    if (index_specials(t)) {
        uint32_t n_specials = t->n_specials;
        bn_tokenizer_destroy(&t);
        return bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory for %u special tokens",
                      n_specials);
    }

    /* One line for the caller's log, only when something is off. */
    int unknown_pre = p->pre.ptr && !str_is(p->pre, "llama3") && !str_is(p->pre, "llama-bpe") &&
                      !str_is(p->pre, "llama-v3");
    size_t w = 0;
    if (unknown_pre)
        w += (size_t)snprintf(t->warning + w, sizeof t->warning - w,
                              "unknown pre-tokenizer '%.*s', using llama3; ",
                              (int)(p->pre.len > 64 ? 64 : p->pre.len), p->pre.ptr);
    if (n_skipped && w < sizeof t->warning)
        w += (size_t)snprintf(t->warning + w, sizeof t->warning - w,
                              "%u merges skipped (malformed, or halves or result not in the vocabulary); ",
                              n_skipped);
    if (n_missing && w < sizeof t->warning)
        w += (size_t)snprintf(t->warning + w, sizeof t->warning - w,
                              "%d bytes have no token (text with them cannot be encoded); ", n_missing);
    if (n_raw && w < sizeof t->warning)
        w += (size_t)snprintf(t->warning + w, sizeof t->warning - w,
                              "%u normal tokens are not byte-encoded (never produced); ", n_raw);
    if (w >= 2 && w < sizeof t->warning)
        t->warning[w - 2] = 0; /* drop the last "; " */
    *out = t;
    return BN_OK;
}

void bn_tokenizer_destroy(bn_tokenizer_t **t)
{
    if (!t || !*t)
        return;
    bn_tokenizer_t *x = *t;
    free(x->bytes);
    free(x->off);
    free(x->kind);
    free(x->table);
    free(x->merges);
    free(x->specials);
    free(x->trie);
    free(x);
    *t = NULL;
}

const char *bn_tokenizer_warning(const bn_tokenizer_t *t)
{
    return t && t->warning[0] ? t->warning : NULL;
}

uint32_t bn_tokenizer_n_vocab(const bn_tokenizer_t *t) { return t ? t->n_vocab : 0; }

size_t bn_tokenizer_max_piece(const bn_tokenizer_t *t) { return t ? t->max_piece : 0; }

static int in_range(const bn_tokenizer_t *t, int32_t id)
{
    return t && id >= 0 && (uint32_t)id < t->n_vocab;
}

int bn_tokenizer_is_special(const bn_tokenizer_t *t, int32_t id)
{
    return in_range(t, id) && (t->kind[id] == KIND_CONTROL || t->kind[id] == KIND_USER);
}

int32_t bn_tokenizer_find(const bn_tokenizer_t *t, const char *text)
{
    if (!t || !text)
        return -1;
    size_t n = strlen(text);
    for (uint32_t k = 0; k < t->n_specials; k++) {
        size_t len;
        const char *s = piece_ptr(t, t->specials[k], &len);
        if (len == n && memcmp(s, text, n) == 0)
            return t->specials[k];
    }
    return table_find(t, text, n);
}

size_t bn_tokenizer_piece(const bn_tokenizer_t *t, int32_t id, char *buf, size_t cap)
{
    if (!in_range(t, id))
        return 0;
    size_t len;
    const char *s = piece_ptr(t, id, &len);
    if (buf && len <= cap && len)
        memcpy(buf, s, len);
    return len;
}

/* ---- encoding ---------------------------------------------------------------- */

typedef struct {
    int32_t id;          /* token of this symbol; -1 once merged into its left one */
    int32_t prev, next;  /* neighbours in the word, -1 at the ends */
} sym_t;

typedef struct {
    uint32_t rank;
    int32_t left, right; /* symbol indices, adjacent when pushed */
    int32_t lid, rid;    /* their ids when pushed: a changed id means a stale entry */
    int32_t id;          /* the merged token */
} bigram_t;

/* Scratch of one encode call (so the tokenizer itself stays read-only). */
typedef struct {
    int32_t *ids;
    size_t n, cap;
    sym_t *sym;
    bigram_t *heap;
    size_t sym_cap, n_heap;
} work_t;

static int push_id(work_t *w, int32_t id)
{
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 64;
        int32_t *v = realloc(w->ids, cap * sizeof *v);
        if (!v)
            return BN_ENOMEM;
        w->ids = v;
        w->cap = cap;
    }
    w->ids[w->n++] = id;
    return BN_OK;
}

/* Heap order: lowest rank first; among equal ranks the leftmost pair. */
static int before(const bigram_t *a, const bigram_t *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void heap_push(work_t *w, bigram_t b)
{
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(&b, &w->heap[parent]))
            break;
        w->heap[i] = w->heap[parent];
        i = parent;
    }
    w->heap[i] = b;
}

static bigram_t heap_pop(work_t *w)
{
    bigram_t top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && before(&w->heap[c + 1], &w->heap[c]))
            c++;
        if (!before(&w->heap[c], &last))
            break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n)
        w->heap[i] = last;
    return top;
}

static void try_pair(const bn_tokenizer_t *t, work_t *w, int32_t left, int32_t right)
{
    if (left < 0 || right < 0)
        return;
    const merge_slot_t *m = merge_find(t, w->sym[left].id, w->sym[right].id);
    if (m) {
        bigram_t b = { m->rank, left, right, w->sym[left].id, w->sym[right].id, m->id };
        heap_push(w, b);
    }
}

/* One pre-token s[0..n) to ids. */
static int encode_word(const bn_tokenizer_t *t, work_t *w, const unsigned char *s, size_t n,
                       char *err, size_t errlen)
{
    int32_t whole = table_find(t, s, n);
    if (whole >= 0) /* ignore_merges: a pre-token in the vocabulary is one token */
        return push_id(w, whole) ? bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory") : BN_OK;
    if (n > w->sym_cap) {
        /* Each merge pushes at most two pairs: n - 1 + 2 (n - 1) entries at most. */
        sym_t *sym = realloc(w->sym, n * sizeof *sym);
        if (sym)
            w->sym = sym;
        bigram_t *heap = realloc(w->heap, 3 * n * sizeof *heap);
        if (heap)
            w->heap = heap;
        if (!sym || !heap)
            return bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory for a %zu-byte word", n);
        w->sym_cap = n;
    }
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[s[i]];
        if (id < 0)
            return bn_err(err, errlen, BN_EFORMAT,
                          "tokenizer: the vocabulary has no token for byte 0x%02x", s[i]);
        w->sym[i] = (sym_t){ id, (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1 };
    }
    w->n_heap = 0;
    for (size_t i = 0; i + 1 < n; i++)
        try_pair(t, w, (int32_t)i, (int32_t)i + 1);
    while (w->n_heap) {
        bigram_t b = heap_pop(w);
        sym_t *l = &w->sym[b.left];
        /* Stale when either side was merged with something else since the push. */
        if (l->id != b.lid || l->next != b.right || w->sym[b.right].id != b.rid)
            continue;
        l->id = b.id;
        l->next = w->sym[b.right].next;
        if (l->next >= 0)
            w->sym[l->next].prev = b.left;
        w->sym[b.right].id = -1;
        try_pair(t, w, l->prev, b.left);
        try_pair(t, w, b.left, l->next);
    }
    for (int32_t i = 0; i >= 0; i = w->sym[i].next)
        if (push_id(w, w->sym[i].id))
            return bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory");
    return BN_OK;
}

/* A text without specials: pre-tokens, each to ids. */
static int encode_fragment(const bn_tokenizer_t *t, work_t *w, const unsigned char *s, size_t n,
                           char *err, size_t errlen)
{
    for (size_t off = 0; off < n;) {
        size_t end = pretok_next(s, n, off);
        int st = encode_word(t, w, s + off, end - off, err, errlen);
        if (st)
            return st;
        off = end;
    }
    return BN_OK;
}

typedef struct {
    uint32_t prio; /* index in t->specials */
    size_t pos;
} match_t;

static int cmp_prio_pos(const void *a, const void *b)
{
    const match_t *x = a, *y = b;
    if (x->prio != y->prio)
        return x->prio < y->prio ? -1 : 1;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

static int cmp_pos(const void *a, const void *b)
{
    const match_t *x = a, *y = b;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* Find the special tokens to split out, in *out (sorted by position, caller frees).
 * llama.cpp's rule: take the specials one at a time, longest first; each takes its
 * leftmost non-overlapping occurrences in the text the earlier ones left over. So
 * the occurrences of every active special are found first (one walk of the trie
 * from each position), then accepted in (priority, position) order when they do
 * not overlap an accepted one. */
static int find_specials(const bn_tokenizer_t *t, const unsigned char *s, size_t n, int parse_special,
                         match_t **out, size_t *n_out)
{
    match_t *m = NULL;
    size_t nm = 0, cap = 0;
    *out = NULL;
    *n_out = 0;
    for (size_t pos = 0; pos < n; pos++) {
        size_t i = pos;
        for (int32_t node = t->root_child[s[pos]]; node >= 0;) {
            int32_t prio = t->trie[node].prio[parse_special != 0];
            i++;
            if (i < n) { /* descend first: the check below may skip this node */
                int32_t c = t->trie[node].child;
                while (c >= 0 && t->trie[c].byte != s[i])
                    c = t->trie[c].sibling;
                node = c;
            } else {
                node = -1;
            }
            if (prio < 0)
                continue;
            if (nm == cap) {
                cap = cap ? 2 * cap : 16;
                match_t *nv = realloc(m, cap * sizeof *m);
                if (!nv) {
                    free(m);
                    return BN_ENOMEM;
                }
                m = nv;
            }
            m[nm++] = (match_t){ (uint32_t)prio, pos };
        }
    }
    if (!nm)
        return BN_OK;
    unsigned char *taken = calloc(n, 1);
    if (!taken) {
        free(m);
        return BN_ENOMEM;
    }
    qsort(m, nm, sizeof *m, cmp_prio_pos);
    size_t kept = 0;
    for (size_t i = 0; i < nm; i++) {
        size_t len = t->off[t->specials[m[i].prio] + 1] - t->off[t->specials[m[i].prio]];
        /* Overlap with an accepted one of higher priority, or with an accepted
         * earlier occurrence of this same special (taken marks both). */
        if (memchr(taken + m[i].pos, 1, len))
            continue;
        memset(taken + m[i].pos, 1, len);
        m[kept++] = m[i];
    }
    free(taken);
    qsort(m, kept, sizeof *m, cmp_pos);
    *out = m;
    *n_out = kept;
    return BN_OK;
}

int bn_tokenizer_encode(const bn_tokenizer_t *t, const char *text, size_t len, int parse_special,
                        int32_t **ids, size_t *n_ids, char *err, size_t errlen)
{
    if (ids)
        *ids = NULL;
    if (n_ids)
        *n_ids = 0;
    if (!t || !ids || !n_ids || (!text && len))
        return bn_err(err, errlen, BN_EINVAL, "tokenizer: encode: NULL argument");
    if (len >= MAX_TEXT)
        return bn_err(err, errlen, BN_ERANGE, "tokenizer: text of %zu bytes is too long", len);
    const unsigned char *s = (const unsigned char *)text;
    match_t *m = NULL;
    size_t nm = 0;
    if (find_specials(t, s, len, parse_special, &m, &nm))
        return bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory");
    work_t w = {0};
    int st = BN_OK;
    size_t pos = 0;
    for (size_t i = 0; i <= nm && st == BN_OK; i++) {
        size_t end = i < nm ? m[i].pos : len;
        st = encode_fragment(t, &w, s + pos, end - pos, err, errlen);
        if (st == BN_OK && i < nm) {
            int32_t id = t->specials[m[i].prio];
            if (push_id(&w, id))
                st = bn_err(err, errlen, BN_ENOMEM, "tokenizer: out of memory");
            pos = end + (t->off[id + 1] - t->off[id]);
        }
    }
    free(m);
    free(w.sym);
    free(w.heap);
    if (st) {
        free(w.ids);
        return st;
    }
    *ids = w.ids;
    *n_ids = w.n;
    return BN_OK;
}

/* ---- streaming decoding ------------------------------------------------------ */

/* How many bytes at the end of a+b (the held-back bytes, then a piece) form the
 * start of a UTF-8 character still waiting for continuation bytes: 0 to 3. */
static size_t incomplete_tail(const unsigned char *a, size_t na, const unsigned char *b, size_t nb)
{
    size_t total = na + nb;
#define AT(i) ((i) < na ? a[(i)] : b[(i) - na])
    for (size_t k = 1; k <= 3 && k <= total; k++) {
        unsigned char c = AT(total - k);
        if (is_cont(c))
            continue;
        unsigned char lo, hi;
        size_t need = utf8_lead(c, &lo, &hi);
        if (need <= k) /* complete, ASCII or not a lead byte: nothing to wait for */
            return 0;
        if (k >= 2) {
            unsigned char c1 = AT(total - k + 1);
            if (c1 < lo || c1 > hi) /* can never become valid: emit as it is */
                return 0;
        }
        return k;
    }
#undef AT
    return 0;
}

size_t bn_detok_push(const bn_tokenizer_t *t, bn_detok_t *d, int32_t id, char *out, size_t cap)
{
    if (!d)
        return 0;
    if (d->n > 3) /* not a state push can leave: treat as a fresh stream */
        d->n = 0;
    size_t len = 0;
    const char *s = "";
    if (in_range(t, id))
        s = piece_ptr(t, id, &len);
    const unsigned char *u = (const unsigned char *)s;
    size_t keep = incomplete_tail(d->pend, d->n, u, len);
    size_t total = d->n + len, emit = total - keep;
    if (emit > cap || (emit && !out))
        return emit;
    /* Emit the first `emit` bytes of pend+piece, keep the rest. */
    unsigned char tail[4];
    for (size_t i = 0; i < keep; i++) {
        size_t at = emit + i;
        tail[i] = at < d->n ? d->pend[at] : u[at - d->n];
    }
    size_t from_pend = emit < d->n ? emit : d->n;
    if (from_pend)
        memcpy(out, d->pend, from_pend);
    if (emit > from_pend)
        memcpy(out + from_pend, s, emit - from_pend);
    memcpy(d->pend, tail, keep);
    d->n = keep;
    return emit;
}

size_t bn_detok_flush(bn_detok_t *d, char *out, size_t cap)
{
    if (!d)
        return 0;
    if (d->n > 3)
        d->n = 0;
    size_t n = d->n;
    if (n > cap || (n && !out))
        return n;
    memcpy(out, d->pend, n);
    d->n = 0;
    return n;
}
