/* test_tokenizer.c - coordinator/tokenizer against the golden tokenization of the
 * fixtures, a naive BPE written here, hand-checked pre-tokenizer cuts, and hostile
 * input. The expected pre-tokenizer cuts were checked with Python's `regex` module
 * on the LLaMA-3 pattern. No test asserts on time; tokenizer_speed prints it. */
#include "test.h"

#include "coordinator/tokenizer.h"
#include "base/status.h"
#include "worker/gguf.h"

#include <string.h>
#include <time.h>

#define FIX "tests/fixtures/"

/* ---- helpers ---------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_next(uint64_t *s)
{
    *s += 0x9E3779B97F4A7C15u; /* splitmix64 */
    uint64_t z = *s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

static int hexval(int c) { return c <= '9' ? c - '0' : (c | 32) - 'a' + 10; }

/* "-" is empty; returns the byte count. */
static size_t unhex(const char *hex, char *out)
{
    size_t n = 0;
    if (strcmp(hex, "-") == 0)
        return 0;
    for (size_t i = 0; hex[i] && hex[i + 1]; i += 2)
        out[n++] = (char)(hexval(hex[i]) * 16 + hexval(hex[i + 1]));
    return n;
}

/* The vocabulary of a fixture model, through the GGUF reader. */
typedef struct {
    bn_gguf_t *g;
    int32_t *types;
    bn_tokenizer_params_t p;
} vocab_t;

static void vocab_load(const char *path, vocab_t *v)
{
    char err[256];
    memset(v, 0, sizeof *v);
    if (bn_gguf_open(path, &v->g, err, sizeof err) != BN_OK)
        BN_FAIL("%s", err);
    const bn_gguf_kv_t *toks = bn_gguf_find(v->g, "tokenizer.ggml.tokens");
    const bn_gguf_kv_t *types = bn_gguf_find(v->g, "tokenizer.ggml.token_type");
    const bn_gguf_kv_t *merges = bn_gguf_find(v->g, "tokenizer.ggml.merges");
    CHECK(toks && types && merges && toks->strs && merges->strs);
    CHECK_EQ_INT(types->n, toks->n);
    v->types = malloc(types->n * sizeof *v->types);
    for (uint64_t i = 0; i < types->n; i++)
        v->types[i] = (int32_t)bn_gguf_arr_int(types, i);
    v->p.n_vocab = (uint32_t)toks->n;
    v->p.tokens = toks->strs;
    v->p.token_types = v->types;
    v->p.n_merges = (uint32_t)merges->n;
    v->p.merges = merges->strs;
    bn_gguf_get_str(v->g, "tokenizer.ggml.model", &v->p.model, NULL, 0);
    bn_gguf_get_str(v->g, "tokenizer.ggml.pre", &v->p.pre, NULL, 0);
}

static void vocab_free(vocab_t *v)
{
    free(v->types);
    bn_gguf_close(&v->g);
}

static bn_tokenizer_t *tok_new(const bn_tokenizer_params_t *p)
{
    char err[256];
    bn_tokenizer_t *t = NULL;
    if (bn_tokenizer_new(p, &t, err, sizeof err) != BN_OK)
        BN_FAIL("bn_tokenizer_new: %s", err);
    return t;
}

static int32_t *encode(const bn_tokenizer_t *t, const char *s, size_t n, int special, size_t *n_ids)
{
    char err[256];
    int32_t *ids = NULL;
    int rc = bn_tokenizer_encode(t, s, n, special, &ids, n_ids, err, sizeof err);
    if (rc != BN_OK)
        BN_FAIL("encode: %s (%s)", err, bn_status_name(rc));
    return ids;
}

/* Concatenated pieces of ids; *len bytes, malloc'd. */
static char *pieces(const bn_tokenizer_t *t, const int32_t *ids, size_t n, size_t *len)
{
    size_t cap = bn_tokenizer_max_piece(t) * n + 1, k = 0;
    char *out = malloc(cap);
    for (size_t i = 0; i < n; i++) {
        size_t m = bn_tokenizer_piece(t, ids[i], out + k, cap - k);
        CHECK(m <= cap - k);
        k += m;
    }
    *len = k;
    return out;
}

/* The streaming decoder over ids; checks that no output chunk ends inside a
 * character that the rest of the stream completes. */
static char *stream(const bn_tokenizer_t *t, const int32_t *ids, size_t n, size_t *len)
{
    size_t cap = (bn_tokenizer_max_piece(t) + 3) * (n + 1) + 1, k = 0;
    char *out = malloc(cap);
    bn_detok_t d = {0};
    for (size_t i = 0; i < n; i++) {
        size_t m = bn_detok_push(t, &d, ids[i], out + k, cap - k);
        CHECK(m <= bn_tokenizer_max_piece(t) + 3);
        k += m;
    }
    size_t m = bn_detok_flush(&d, out + k, cap - k);
    CHECK(m <= 3);
    k += m;
    CHECK_EQ_INT(d.n, 0);
    *len = k;
    return out;
}

static void check_bytes(const char *what, const char *got, size_t ng, const char *want, size_t nw)
{
    if (ng == nw && memcmp(got, want, ng) == 0)
        return;
    fprintf(stderr, "%s: %zu bytes, expected %zu\n  got  ", what, ng, nw);
    for (size_t i = 0; i < ng && i < 64; i++)
        fprintf(stderr, "%02x", (unsigned char)got[i]);
    fprintf(stderr, "\n  want ");
    for (size_t i = 0; i < nw && i < 64; i++)
        fprintf(stderr, "%02x", (unsigned char)want[i]);
    BN_FAIL("bytes differ");
}

static void check_ids(const char *what, const int32_t *got, size_t ng, const int32_t *want, size_t nw)
{
    for (size_t i = 0; i < ng && i < nw; i++)
        if (got[i] != want[i])
            BN_FAIL("%s: id %zu is %d, expected %d (%zu vs %zu ids)", what, i, got[i], want[i], ng, nw);
    if (ng != nw)
        BN_FAIL("%s: %zu ids, expected %zu", what, ng, nw);
}

/* decode(encode(x)) == x, with and without specials, by pieces and by stream. */
static void check_round_trip(const bn_tokenizer_t *t, const char *s, size_t n)
{
    for (int special = 0; special < 2; special++) {
        size_t n_ids, len;
        int32_t *ids = encode(t, s, n, special, &n_ids);
        CHECK(n_ids <= n);
        for (size_t i = 0; i < n_ids; i++)
            CHECK(ids[i] >= 0 && (uint32_t)ids[i] < bn_tokenizer_n_vocab(t));
        char *back = pieces(t, ids, n_ids, &len);
        check_bytes("pieces(encode(x))", back, len, s, n);
        free(back);
        back = stream(t, ids, n_ids, &len);
        check_bytes("stream(encode(x))", back, len, s, n);
        free(back);
        free(ids);
    }
}

/* GPT-2 byte-to-unicode, the forward direction (the tokenizer only needs the
 * inverse): printable bytes stand for themselves, the other 68 get U+0100.. in
 * increasing byte order. Writes the UTF-8 of byte b's character; returns its length. */
static size_t gpt2_encode_byte(unsigned char b, char *out)
{
    unsigned cp = b;
    if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)) {
        unsigned n = 0;
        for (unsigned x = 0; x < b; x++)
            n += !((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE);
        cp = 0x100 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* A synthetic vocabulary: the 256 byte tokens (ids 0..255, byte order) and then
 * `extra` tokens given as raw bytes (byte-encoded here unless special), merges
 * given as raw "left right" with ASCII halves. */
typedef struct {
    bn_str_t tok[300];
    int32_t type[300];
    bn_str_t merge[32];
    char text[300][64];
    uint32_t n_vocab, n_merges;
    bn_tokenizer_params_t p;
} synth_t;

static void synth_init(synth_t *s)
{
    memset(s, 0, sizeof *s);
    for (int b = 0; b < 256; b++) {
        size_t n = gpt2_encode_byte((unsigned char)b, s->text[b]);
        s->tok[b] = (bn_str_t){ s->text[b], n };
        s->type[b] = BN_TOKEN_NORMAL;
    }
    s->n_vocab = 256;
}

static int32_t synth_add(synth_t *s, const char *raw, int type)
{
    uint32_t i = s->n_vocab++;
    size_t n = 0;
    for (const char *c = raw; *c; c++)
        n += type == BN_TOKEN_NORMAL ? gpt2_encode_byte((unsigned char)*c, s->text[i] + n)
                                     : (size_t)(s->text[i][n] = *c, 1);
    s->tok[i] = (bn_str_t){ s->text[i], n };
    s->type[i] = type;
    return (int32_t)i;
}

static void synth_merge(synth_t *s, const char *m)
{
    s->merge[s->n_merges++] = (bn_str_t){ m, strlen(m) };
}

static const bn_tokenizer_params_t *synth_params(synth_t *s)
{
    s->p = (bn_tokenizer_params_t){ .n_vocab = s->n_vocab, .tokens = s->tok, .token_types = s->type,
                                    .n_merges = s->n_merges, .merges = s->merge };
    return &s->p;
}

static void check_encode(const bn_tokenizer_t *t, const char *s, int special, const int32_t *want, size_t nw)
{
    size_t n;
    int32_t *ids = encode(t, s, strlen(s), special, &n);
    check_ids(s, ids, n, want, nw);
    free(ids);
}

/* ---- the golden file -------------------------------------------------------- */

static void golden_file(const bn_tokenizer_t *t, int *n_tok, int *n_detok)
{
    FILE *f = fopen(FIX "tiny.tokenizer.txt", "r");
    CHECK(f != NULL);
    static char line[1 << 16], bytes[1 << 15];
    int32_t want[4096];
    *n_tok = *n_detok = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "tok ", 4) == 0) {
            size_t nb = unhex(strtok(line + 4, " \n"), bytes);
            size_t nw = (size_t)atoi(strtok(NULL, " \n"));
            for (size_t i = 0; i < nw; i++)
                want[i] = atoi(strtok(NULL, " \n"));
            size_t n;
            int32_t *ids = encode(t, bytes, nb, 1, &n);
            char what[64];
            snprintf(what, sizeof what, "tok line %d", *n_tok + 1);
            check_ids(what, ids, n, want, nw);
            free(ids);
            ++*n_tok;
        } else if (strncmp(line, "detok ", 6) == 0) {
            size_t nw = (size_t)atoi(strtok(line + 6, " \n"));
            for (size_t i = 0; i < nw; i++)
                want[i] = atoi(strtok(NULL, " \n"));
            size_t nb = unhex(strtok(NULL, " \n"), bytes), len;
            char *got = pieces(t, want, nw, &len);
            check_bytes("detok by pieces", got, len, bytes, nb);
            free(got);
            got = stream(t, want, nw, &len);
            check_bytes("detok by stream", got, len, bytes, nb);
            free(got);
            ++*n_detok;
        }
    }
    fclose(f);
}

BN_TEST(tokenizer_golden)
{
    int n_tok, n_detok;
    vocab_t v;
    vocab_load(FIX "tiny-b158-i2_s.gguf", &v);
    CHECK(v.p.pre.ptr == NULL); /* no pre key: llama3 by default */
    bn_tokenizer_t *t = tok_new(&v.p);
    CHECK(bn_tokenizer_warning(t) == NULL);
    CHECK_EQ_INT(bn_tokenizer_n_vocab(t), 512);
    golden_file(t, &n_tok, &n_detok);
    CHECK_EQ_INT(n_tok, 30);
    CHECK_EQ_INT(n_detok, 32);
    CHECK_EQ_INT(bn_tokenizer_find(t, "<|begin_of_text|>"), 496);
    CHECK_EQ_INT(bn_tokenizer_find(t, "<|end_of_text|>"), 497);
    CHECK_EQ_INT(bn_tokenizer_find(t, "<|eot_id|>"), 505);
    CHECK_EQ_INT(bn_tokenizer_find(t, " "), 220);
    CHECK_EQ_INT(bn_tokenizer_find(t, "!"), 0);
    CHECK_EQ_INT(bn_tokenizer_find(t, "<|no such token|>"), -1);
    CHECK(bn_tokenizer_is_special(t, 505) && !bn_tokenizer_is_special(t, 220));
    char b[8];
    CHECK_EQ_INT(bn_tokenizer_piece(t, 188, b, sizeof b), 1); /* "Ā" stands for byte 0 */
    CHECK_EQ_INT(b[0], 0);
    bn_tokenizer_destroy(&t);
    CHECK(t == NULL);
    vocab_free(&v);

    /* The `bitnet` file names its pre-tokenizer "llama-bpe": same ids, no warning. */
    vocab_load(FIX "tiny-bitnet-tq2_0.gguf", &v);
    CHECK(v.p.pre.ptr && v.p.pre.len == 9 && memcmp(v.p.pre.ptr, "llama-bpe", 9) == 0);
    t = tok_new(&v.p);
    CHECK(bn_tokenizer_warning(t) == NULL);
    golden_file(t, &n_tok, &n_detok);
    CHECK_EQ_INT(n_tok, 30);
    bn_tokenizer_destroy(&t);
    vocab_free(&v);
}

/* ---- pre-tokenizer cuts ----------------------------------------------------- */

/* `cuts` lists the expected pre-tokens separated by '|' (none of the cases has a
 * '|' of its own). */
static void check_cuts(const char *text, const char *cuts)
{
    size_t *ends, n;
    CHECK_EQ_INT(bn_tokenizer_pretokenize(text, strlen(text), &ends, &n, NULL, 0), BN_OK);
    char got[512];
    size_t k = 0, start = 0;
    for (size_t i = 0; i < n; i++) {
        if (i)
            got[k++] = '|';
        memcpy(got + k, text + start, ends[i] - start);
        k += ends[i] - start;
        start = ends[i];
    }
    got[k] = 0;
    free(ends);
    if (strcmp(got, cuts) != 0)
        BN_FAIL("pre-tokens of \"%s\": \"%s\", expected \"%s\"", text, got, cuts);
}

BN_TEST(tokenizer_pretok)
{
    /* Contractions, case-insensitive, and what is not one. */
    check_cuts("I'd've it's SHE'LL we'Re", "I|'d|'ve| it|'s| SHE|'LL| we|'Re");
    check_cuts("'x 'sx '", "'x| '|sx| '");
    check_cuts("'\xc5\xbf", "'\xc5\xbf");              /* long s folds onto s */
    /* A letter run takes one non-letter, non-digit, non-newline prefix. */
    check_cuts("(paren)  [x]", "(paren|)| | [|x|]");
    check_cuts("\tword\nword", "\tword|\n|word");
    check_cuts("a\xc2\xa0" "b", "a|\xc2\xa0" "b");      /* NBSP is a prefix like a space */
    check_cuts("1word", "1|word");
    /* Digits in groups of three; other numbers too (superscript, Arabic-Indic). */
    check_cuts("1234567 x12", "123|456|7| x|12");
    check_cuts("\xc2\xb2\xd9\xa3\xd9\xa3\xd9\xa3\xd9\xa3", "\xc2\xb2\xd9\xa3\xd9\xa3|\xd9\xa3\xd9\xa3");
    /* Punctuation with an optional space before and newlines after. */
    check_cuts("a ... b!!\n\nc", "a| ...| b|!!\n\n|c");
    check_cuts("x  ?", "x| | ?");
    /* \s*[\r\n]+ ends at the last newline of a whitespace run. */
    check_cuts("a \n \n  b", "a| \n \n| | b");
    check_cuts("a\r\n\r\n", "a|\r\n\r\n");
    check_cuts("\n\t\nx", "\n\t\n|x");
    /* \s+(?!\S): a run before a non-space leaves its last character to the word
     * (as its prefix); a run at the end is whole; a single space is alone. */
    check_cuts("a   b", "a|  | b");
    check_cuts("a   ", "a|   ");
    check_cuts("a \t1", "a| |\t|1");
    check_cuts("   ", "   ");
    check_cuts(" ", " ");
    check_cuts("\xe3\x80\x80\xe3\x80\x80x", "\xe3\x80\x80|\xe3\x80\x80x"); /* U+3000 */
    /* U+001C..001F are not White_Space, unlike Python's str.isspace(). */
    check_cuts("a\x1c" "b", "a|\x1c" "b");
    /* Invalid bytes are one "other" character each. */
    check_cuts("\xff\xfe" "abc", "\xff\xfe|abc");
    check_cuts(" \xff" "abc", " \xff|abc");
    check_cuts("\xff" "abc", "\xff" "abc");
    check_cuts("x\x80\x80 y", "x|\x80\x80| y");
    check_cuts("", "");
}

/* ---- BPE ---------------------------------------------------------------------- */

BN_TEST(tokenizer_bpe_rules)
{
    synth_t s;
    synth_init(&s);
    int32_t ab = synth_add(&s, "ab", BN_TOKEN_NORMAL);
    int32_t bc = synth_add(&s, "bc", BN_TOKEN_NORMAL);
    int32_t aa = synth_add(&s, "aa", BN_TOKEN_NORMAL);
    int32_t xyz = synth_add(&s, "xyz", BN_TOKEN_NORMAL); /* no merge builds it */
    synth_add(&s, "ab", BN_TOKEN_NORMAL);                 /* duplicate: the first wins */
    synth_merge(&s, "b c");  /* rank 0 */
    synth_merge(&s, "a b");  /* rank 1 */
    synth_merge(&s, "a a");  /* rank 2 */
    synth_merge(&s, "a b");  /* repeated: keeps rank 1 */
    synth_merge(&s, "q r");  /* "qr" is not a token: skipped */
    synth_merge(&s, "nospace");
    bn_tokenizer_t *t = tok_new(synth_params(&s));
    CHECK(bn_tokenizer_warning(t) && strstr(bn_tokenizer_warning(t), "2 merges skipped"));
    /* Lowest rank first: "b c" before "a b". */
    check_encode(t, "abc", 0, (int32_t[]){ 'a', bc }, 2);
    check_encode(t, "abd", 0, (int32_t[]){ ab, 'd' }, 2);
    /* Equal ranks: leftmost first. */
    check_encode(t, "aaa", 0, (int32_t[]){ aa, 'a' }, 2);
    check_encode(t, "aaaa", 0, (int32_t[]){ aa, aa }, 2);
    /* ignore_merges: a pre-token in the vocabulary is one token. */
    check_encode(t, "xyz", 0, (int32_t[]){ xyz }, 1);
    check_encode(t, "xyzz", 0, (int32_t[]){ 'x', 'y', 'z', 'z' }, 4);
    check_encode(t, "ab", 0, (int32_t[]){ ab }, 1);
    CHECK_EQ_INT(bn_tokenizer_find(t, "ab"), ab);
    bn_tokenizer_destroy(&t);
}

/* The same BPE rules, naively: find the lowest-rank (then leftmost) adjacent pair
 * by scanning, merge, repeat. Symbols are byte strings; merges are decoded here. */
typedef struct {
    char l[64], r[64];
    size_t nl, nr;
} naive_merge_t;

static size_t gpt2_decode_str(const char *s, size_t n, char *out)
{
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        char enc[2];
        int found = 0;
        for (int b = 0; b < 256 && !found; b++) {
            size_t m = gpt2_encode_byte((unsigned char)b, enc);
            if (m <= n - i && memcmp(s + i, enc, m) == 0) {
                out[k++] = (char)b;
                i += m;
                found = 1;
            }
        }
        CHECK(found);
    }
    return k;
}

static void naive_word(const bn_tokenizer_t *t, const naive_merge_t *mg, size_t n_mg,
                       const char *w, size_t n, int32_t *out, size_t *n_out)
{
    char sym[256][64];
    size_t len[256], ns = n;
    CHECK(n <= 256);
    for (size_t i = 0; i < n; i++) {
        sym[i][0] = w[i];
        len[i] = 1;
    }
    for (;;) {
        size_t best = SIZE_MAX, at = 0;
        for (size_t i = 0; i + 1 < ns; i++)
            for (size_t r = 0; r < n_mg && r < best; r++)
                if (mg[r].nl == len[i] && mg[r].nr == len[i + 1] && !memcmp(mg[r].l, sym[i], len[i]) &&
                    !memcmp(mg[r].r, sym[i + 1], len[i + 1])) {
                    best = r;
                    at = i;
                }
        if (best == SIZE_MAX)
            break;
        memcpy(sym[at] + len[at], sym[at + 1], len[at + 1]);
        len[at] += len[at + 1];
        memmove(&sym[at + 1], &sym[at + 2], (ns - at - 2) * sizeof sym[0]);
        memmove(&len[at + 1], &len[at + 2], (ns - at - 2) * sizeof len[0]);
        ns--;
    }
    for (size_t i = 0; i < ns; i++) {
        char z[65];
        memcpy(z, sym[i], len[i]);
        z[len[i]] = 0;
        int32_t id = bn_tokenizer_find(t, z);
        CHECK(id >= 0);
        out[(*n_out)++] = id;
    }
}

BN_TEST(tokenizer_bpe_vs_naive)
{
    vocab_t v;
    vocab_load(FIX "tiny-b158-i2_s.gguf", &v);
    bn_tokenizer_t *t = tok_new(&v.p);
    naive_merge_t *mg = calloc(v.p.n_merges, sizeof *mg);
    for (uint32_t i = 0; i < v.p.n_merges; i++) {
        bn_str_t m = v.p.merges[i];
        const char *sp = memchr(m.ptr + 1, ' ', m.len - 1);
        CHECK(sp);
        mg[i].nl = gpt2_decode_str(m.ptr, (size_t)(sp - m.ptr), mg[i].l);
        mg[i].nr = gpt2_decode_str(sp + 1, m.len - (size_t)(sp - m.ptr) - 1, mg[i].r);
    }
    /* Random words over the letters the merges use most, plus spaces and a few
     * others; whole words in the vocabulary are checked as such. */
    static const char alpha[] = "etaoinshrdlucmfwypvbgkqjxz      ETAO.,'\n0123";
    uint64_t seed = bn_test_seed();
    char text[200];
    int32_t want[400];
    for (int iter = 0; iter < 3000; iter++) {
        size_t n = rng_next(&seed) % 60;
        for (size_t i = 0; i < n; i++)
            text[i] = alpha[rng_next(&seed) % (sizeof alpha - 1)];
        size_t *ends, ne, nw = 0, start = 0;
        CHECK_EQ_INT(bn_tokenizer_pretokenize(text, n, &ends, &ne, NULL, 0), BN_OK);
        for (size_t k = 0; k < ne; k++) {
            char z[201];
            memcpy(z, text + start, ends[k] - start);
            z[ends[k] - start] = 0;
            int32_t whole = bn_tokenizer_find(t, z);
            if (whole >= 0 && !bn_tokenizer_is_special(t, whole))
                want[nw++] = whole;
            else
                naive_word(t, mg, v.p.n_merges, text + start, ends[k] - start, want, &nw);
            start = ends[k];
        }
        free(ends);
        size_t ng;
        int32_t *got = encode(t, text, n, 1, &ng);
        text[n] = 0;
        check_ids(text, got, ng, want, nw);
        free(got);
    }
    free(mg);
    bn_tokenizer_destroy(&t);
    vocab_free(&v);
}

/* ---- special tokens ------------------------------------------------------------ */

BN_TEST(tokenizer_specials)
{
    synth_t s;
    synth_init(&s);
    int32_t ab = synth_add(&s, "<ab>", BN_TOKEN_CONTROL);
    int32_t bcd = synth_add(&s, "b>cde", BN_TOKEN_CONTROL);
    int32_t user = synth_add(&s, "@me", BN_TOKEN_USER_DEFINED);
    synth_add(&s, "", BN_TOKEN_CONTROL); /* empty: never matched */
    bn_tokenizer_t *t = tok_new(synth_params(&s));
    /* Longest first over the whole text, not leftmost first: "b>cde" beats the
     * earlier, shorter "<ab>" where they overlap. */
    check_encode(t, "<ab>cde", 1, (int32_t[]){ '<', 'a', bcd }, 3);
    check_encode(t, "<ab><ab>", 1, (int32_t[]){ ab, ab }, 2);
    /* CONTROL only with parse_special; USER_DEFINED always. */
    check_encode(t, "<ab>", 0, (int32_t[]){ '<', 'a', 'b', '>' }, 4);
    check_encode(t, "x@me", 0, (int32_t[]){ 'x', user }, 2);
    check_encode(t, "x@me", 1, (int32_t[]){ 'x', user }, 2);
    /* The text around a special is pre-tokenized on its own: "a " before a
     * special is at the end of its fragment, so the space stays with nothing. */
    check_encode(t, "a <ab> b", 1, (int32_t[]){ 'a', ' ', ab, ' ', 'b' }, 5);
    char buf[8];
    CHECK_EQ_INT(bn_tokenizer_piece(t, ab, buf, sizeof buf), 4);
    CHECK(memcmp(buf, "<ab>", 4) == 0);
    CHECK_EQ_INT(bn_tokenizer_find(t, "<ab>"), ab);
    bn_tokenizer_destroy(&t);

    /* On the real vocabulary, without parse_special the text of a special is
     * ordinary text, and still round-trips. */
    vocab_t v;
    vocab_load(FIX "tiny-b158-i2_s.gguf", &v);
    t = tok_new(&v.p);
    const char *chat = "<|begin_of_text|>User: hi<|eot_id|>Assistant: ";
    size_t n;
    int32_t *ids = encode(t, chat, strlen(chat), 0, &n);
    for (size_t i = 0; i < n; i++)
        CHECK(!bn_tokenizer_is_special(t, ids[i]));
    free(ids);
    ids = encode(t, chat, strlen(chat), 1, &n);
    CHECK_EQ_INT(ids[0], 496);
    free(ids);
    check_round_trip(t, chat, strlen(chat));
    bn_tokenizer_destroy(&t);
    vocab_free(&v);
}

/* llama.cpp's partition, naively: the specials one at a time in priority order
 * (longer first, then lower id), each splitting every raw fragment left so far at
 * its leftmost non-overlapping occurrences. Raw bytes come out as byte ids. */
typedef struct {
    size_t start, len;
    int32_t id; /* -1: raw text */
} frag_t;

static size_t naive_partition(const synth_t *s, const int32_t *prio, size_t n_prio, int parse_special,
                              const char *text, size_t n, int32_t *out)
{
    frag_t fr[512], nf[512];
    size_t nfr = 1;
    fr[0] = (frag_t){ 0, n, -1 };
    for (size_t k = 0; k < n_prio; k++) {
        int32_t id = prio[k];
        size_t len = s->tok[id].len;
        if (len == 0 || (s->type[id] == BN_TOKEN_CONTROL && !parse_special))
            continue;
        size_t m = 0;
        for (size_t f = 0; f < nfr; f++) {
            if (fr[f].id >= 0) {
                nf[m++] = fr[f];
                continue;
            }
            size_t a = fr[f].start, end = fr[f].start + fr[f].len;
            for (size_t p = a; p + len <= end;) {
                if (memcmp(text + p, s->tok[id].ptr, len) != 0) {
                    p++;
                    continue;
                }
                if (p > a)
                    nf[m++] = (frag_t){ a, p - a, -1 };
                nf[m++] = (frag_t){ p, len, id };
                p += len;
                a = p;
            }
            if (a < end)
                nf[m++] = (frag_t){ a, end - a, -1 };
        }
        memcpy(fr, nf, m * sizeof *fr);
        nfr = m;
    }
    size_t k = 0;
    for (size_t f = 0; f < nfr; f++)
        if (fr[f].id >= 0)
            out[k++] = fr[f].id;
        else
            for (size_t i = 0; i < fr[f].len; i++)
                out[k++] = (unsigned char)text[fr[f].start + i];
    return k;
}

BN_TEST(tokenizer_specials_vs_naive)
{
    uint64_t seed = bn_test_seed();
    static synth_t s;
    for (int iter = 0; iter < 400; iter++) {
        synth_init(&s);
        /* Specials over a 3-letter alphabet, so they overlap and nest a lot. */
        int n_sp = 1 + (int)(rng_next(&seed) % 8);
        char texts[8][8];
        for (int k = 0; k < n_sp; k++) {
            size_t len = 1 + rng_next(&seed) % 4;
            for (size_t i = 0; i < len; i++)
                texts[k][i] = "ab<"[rng_next(&seed) % 3];
            texts[k][len] = 0;
            synth_add(&s, texts[k], rng_next(&seed) % 2 ? BN_TOKEN_CONTROL : BN_TOKEN_USER_DEFINED);
        }
        /* Priority order: longer text first, then lower id. */
        int32_t prio[8];
        for (int k = 0; k < n_sp; k++)
            prio[k] = 256 + k;
        for (int a = 1; a < n_sp; a++)
            for (int b = a; b > 0 && s.tok[prio[b]].len > s.tok[prio[b - 1]].len; b--) {
                int32_t x = prio[b];
                prio[b] = prio[b - 1];
                prio[b - 1] = x;
            }
        bn_tokenizer_t *t = tok_new(synth_params(&s));
        char text[64];
        size_t n = rng_next(&seed) % 40;
        for (size_t i = 0; i < n; i++)
            text[i] = "ab<"[rng_next(&seed) % 3];
        for (int special = 0; special < 2; special++) {
            int32_t want[64];
            size_t nw = naive_partition(&s, prio, (size_t)n_sp, special, text, n, want), ng;
            int32_t *got = encode(t, text, n, special, &ng);
            char what[128];
            snprintf(what, sizeof what, "\"%.*s\" with %d specials, parse_special %d", (int)n, text, n_sp,
                     special);
            check_ids(what, got, ng, want, nw);
            free(got);
        }
        bn_tokenizer_destroy(&t);
    }
}

/* ---- streaming decoding -------------------------------------------------------- */

/* True when out[0..n) ends inside a character: a lead byte followed by fewer
 * continuation bytes than it announces. */
static int ends_mid_char(const unsigned char *out, size_t n)
{
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        unsigned char c = out[n - k];
        if ((c & 0xC0) == 0x80)
            continue;
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > k;
    }
    return 0;
}

BN_TEST(tokenizer_stream_utf8)
{
    vocab_t v;
    vocab_load(FIX "tiny-b158-i2_s.gguf", &v);
    bn_tokenizer_t *t = tok_new(&v.p);
    /* "😀" (F0 9F 98 80) as four byte tokens, then "é" (C3 A9) as two, then 'a'. */
    const char *text = "\xf0\x9f\x98\x80\xc3\xa9" "a";
    int32_t ids[7];
    for (int i = 0; i < 7; i++) {
        char z[2] = { text[i], 0 };
        ids[i] = bn_tokenizer_find(t, z);
        CHECK(ids[i] >= 0);
    }
    const size_t expect[7] = { 0, 0, 0, 4, 0, 2, 1 };
    bn_detok_t d = {0};
    char out[64];
    size_t total = 0;
    for (int i = 0; i < 7; i++) {
        size_t m = bn_detok_push(t, &d, ids[i], out + total, sizeof out - total);
        CHECK_EQ_INT(m, expect[i]);
        total += m;
    }
    CHECK_EQ_INT(bn_detok_flush(&d, out + total, sizeof out - total), 0);
    check_bytes("stream", out, total, text, 7);

    /* A buffer too small: the size is returned, nothing written, state kept. */
    d = (bn_detok_t){0};
    int32_t eot = bn_tokenizer_find(t, "<|eot_id|>");
    CHECK_EQ_INT(bn_detok_push(t, &d, ids[0], out, sizeof out), 0);
    CHECK_EQ_INT(bn_detok_push(t, &d, eot, out, 3), 11); /* F0 + "<|eot_id|>" */
    CHECK_EQ_INT(d.n, 1);
    CHECK_EQ_INT(bn_detok_push(t, &d, eot, out, sizeof out), 11);
    check_bytes("invalid lead then special", out, 11, "\xf0<|eot_id|>", 11);
    /* A truncated character at the end comes out of flush as it is. */
    CHECK_EQ_INT(bn_detok_push(t, &d, ids[4], out, sizeof out), 0);
    CHECK_EQ_INT(bn_detok_flush(&d, out, 0), 1);
    CHECK_EQ_INT(bn_detok_flush(&d, out, sizeof out), 1);
    CHECK_EQ_INT((unsigned char)out[0], 0xC3);
    CHECK_EQ_INT(d.n, 0);
    /* Out-of-range ids emit nothing; a byte that can never start a completed
     * character (E0 80: overlong) is not held back. */
    CHECK_EQ_INT(bn_detok_push(t, &d, -1, out, sizeof out), 0);
    CHECK_EQ_INT(bn_detok_push(t, &d, 512, out, sizeof out), 0);
    char e0[2] = { (char)0xE0, 0 }, x80[2] = { (char)0x80, 0 };
    CHECK_EQ_INT(bn_detok_push(t, &d, bn_tokenizer_find(t, e0), out, sizeof out), 0);
    CHECK_EQ_INT(bn_detok_push(t, &d, bn_tokenizer_find(t, x80), out, sizeof out), 2);

    /* Random byte tokens and multi-byte pieces: output equals the pieces, and no
     * chunk ends inside a character that the stream then completes. */
    uint64_t seed = bn_test_seed();
    static const char *chars[] = { "a", " ", "\xc3\xa9", "\xe6\x97\xa5", "\xf0\x9f\x98\x80", "\xff", "\x80",
                                   "\xe6\x97", "\xc3" };
    for (int iter = 0; iter < 200; iter++) {
        char src[512];
        size_t n = 0;
        int clean = 1;
        while (n < 400) {
            size_t c = rng_next(&seed) % (sizeof chars / sizeof chars[0]);
            clean &= c < 5;
            memcpy(src + n, chars[c], strlen(chars[c]));
            n += strlen(chars[c]);
        }
        /* One token per byte: the hardest case for the decoder. */
        int32_t bid[512];
        for (size_t i = 0; i < n; i++) {
            char z[2] = { src[i], 0 };
            bid[i] = src[i] ? bn_tokenizer_find(t, z) : 188;
        }
        bn_detok_t sd = {0};
        char dst[1024];
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            size_t m = bn_detok_push(t, &sd, bid[i], dst + k, sizeof dst - k);
            k += m;
            if (clean && m)
                CHECK(!ends_mid_char((unsigned char *)dst, k));
        }
        k += bn_detok_flush(&sd, dst + k, sizeof dst - k);
        check_bytes("random stream", dst, k, src, n);
        check_round_trip(t, src, n);
    }
    bn_tokenizer_destroy(&t);
    vocab_free(&v);
}

/* ---- hostile input -------------------------------------------------------------- */

BN_TEST(tokenizer_bad_input)
{
    vocab_t v;
    vocab_load(FIX "tiny-b158-i2_s.gguf", &v);
    bn_tokenizer_t *t = tok_new(&v.p);
    char err[256];
    int32_t sentinel = 0, *ids = &sentinel; /* encode must reset it to NULL */
    size_t n = 99;

    /* Empty text, NULL text of length 0, NULL arguments. */
    CHECK_EQ_INT(bn_tokenizer_encode(t, "", 0, 1, &ids, &n, err, sizeof err), BN_OK);
    CHECK(ids == NULL && n == 0);
    CHECK_EQ_INT(bn_tokenizer_encode(t, NULL, 0, 1, &ids, &n, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_tokenizer_encode(t, NULL, 5, 1, &ids, &n, err, sizeof err), BN_EINVAL);
    CHECK_EQ_INT(bn_tokenizer_encode(NULL, "a", 1, 1, &ids, &n, err, sizeof err), BN_EINVAL);
    CHECK_EQ_INT(bn_tokenizer_encode(t, "a", 1, 1, NULL, &n, NULL, 0), BN_EINVAL);

    /* Invalid UTF-8, NUL bytes, lone continuation bytes, surrogates, overlongs. */
    static const char *nasty[] = {
        "\xff\xfe\xfd", "a\0b\0\0c", "\x80\x80\x80 x", "\xed\xa0\x80", "\xc0\xaf", "\xf4\x90\x80\x80",
        "\xe6\x97", "caf\xc3", "<|eot_id|\0>", "'\xc5", "\xf0\x9f\x98\x80\xf0\x9f", "\r\r\n\n\r",
    };
    static const size_t nasty_len[] = { 3, 6, 5, 3, 2, 4, 2, 4, 11, 2, 6, 5 };
    for (size_t i = 0; i < sizeof nasty / sizeof nasty[0]; i++)
        check_round_trip(t, nasty[i], nasty_len[i]);

    /* Very long runs of one character: one pre-token of 100k bytes each. */
    size_t big = 100000;
    char *run = malloc(big);
    static const char fill[] = { ' ', 'a', '\n', '1', '.', '\xff' };
    for (size_t f = 0; f < sizeof fill; f++) {
        memset(run, fill[f], big);
        check_round_trip(t, run, big);
    }
    free(run);

    /* Random bytes, and random mixes of bytes and fragments of specials. */
    uint64_t seed = bn_test_seed();
    static const char *frag[] = { "<|eot_id|>", "<|", "|>", " ", "\n", "'s", "\xc3", "\xa9", "9" };
    for (int iter = 0; iter < 300; iter++) {
        char buf[300];
        size_t len = rng_next(&seed) % 200;
        for (size_t i = 0; i < len;) {
            uint64_t r = rng_next(&seed);
            if (r % 3 == 0) {
                const char *fr = frag[(r >> 8) % (sizeof frag / sizeof frag[0])];
                size_t fl = strlen(fr);
                if (i + fl > len)
                    fl = len - i;
                memcpy(buf + i, fr, fl);
                i += fl;
            } else {
                buf[i++] = (char)(r >> 16);
            }
        }
        check_round_trip(t, buf, len);
    }

    /* Pieces: out of range gives 0; a too-small buffer gets nothing. */
    char b[4] = "xyz";
    CHECK_EQ_INT(bn_tokenizer_piece(t, -1, b, sizeof b), 0);
    CHECK_EQ_INT(bn_tokenizer_piece(t, 512, b, sizeof b), 0);
    CHECK_EQ_INT(bn_tokenizer_piece(t, INT32_MAX, b, sizeof b), 0);
    CHECK_EQ_INT(bn_tokenizer_piece(t, 505, b, 3), 10);
    CHECK(memcmp(b, "xyz", 3) == 0);
    CHECK_EQ_INT(bn_tokenizer_piece(NULL, 5, b, sizeof b), 0);
    CHECK_EQ_INT(bn_tokenizer_find(t, ""), -1);
    CHECK_EQ_INT(bn_tokenizer_find(NULL, "a"), -1);
    CHECK_EQ_INT(bn_tokenizer_pretokenize(NULL, 3, NULL, NULL, NULL, 0), BN_EINVAL);
    bn_tokenizer_destroy(&t);
    bn_tokenizer_destroy(&t); /* NULL again: fine */
    bn_tokenizer_destroy(NULL);

    /* Construction: bad arguments are errors with a message, never crashes. */
    bn_tokenizer_params_t p = v.p;
    CHECK_EQ_INT(bn_tokenizer_new(NULL, &t, err, sizeof err), BN_EINVAL);
    CHECK_EQ_INT(bn_tokenizer_new(&p, NULL, err, sizeof err), BN_EINVAL);
    p.n_vocab = 0;
    CHECK_EQ_INT(bn_tokenizer_new(&p, &t, err, sizeof err), BN_ERANGE);
    CHECK(t == NULL);
    p = v.p;
    p.model = (bn_str_t){ "llama", 5 };
    CHECK_EQ_INT(bn_tokenizer_new(&p, &t, err, sizeof err), BN_EUNSUPPORTED);
    CHECK(strstr(err, "llama") != NULL);
    p = v.p;
    bn_str_t toks[3] = { { "a", 1 }, { NULL, 4 }, { "b", 1 } };
    p.tokens = toks;
    p.n_vocab = 3;
    p.token_types = NULL;
    CHECK_EQ_INT(bn_tokenizer_new(&p, &t, err, sizeof err), BN_EINVAL);
    p.merges = NULL;
    p.tokens = v.p.tokens;
    p.n_vocab = v.p.n_vocab;
    CHECK_EQ_INT(bn_tokenizer_new(&p, &t, err, sizeof err), BN_EINVAL);

    /* An unknown pre-tokenizer works as llama3, with a warning. */
    p = v.p;
    p.pre = (bn_str_t){ "qwen2", 5 };
    t = tok_new(&p);
    CHECK(bn_tokenizer_warning(t) && strstr(bn_tokenizer_warning(t), "qwen2"));
    check_encode(t, "Hello world", 1, (int32_t[]){ 39, 68, 282, 78, 346, 298 }, 6);
    bn_tokenizer_destroy(&t);

    /* A vocabulary without some byte tokens: encoding text that needs one is an
     * error naming the byte; other text still works. Tokens that are not
     * byte-encoded are kept but never produced. */
    bn_str_t few[4] = { { "a", 1 }, { "b", 1 }, { "\xc4\xa0", 2 }, { "\xe2\x82\xac", 3 } };
    bn_tokenizer_params_t q = { .n_vocab = 4, .tokens = few };
    t = tok_new(&q);
    CHECK(bn_tokenizer_warning(t) && strstr(bn_tokenizer_warning(t), "253 bytes have no token"));
    CHECK(strstr(bn_tokenizer_warning(t), "1 normal tokens are not byte-encoded"));
    check_encode(t, "ab a", 0, (int32_t[]){ 0, 1, 2, 0 }, 4);
    ids = NULL;
    CHECK_EQ_INT(bn_tokenizer_encode(t, "abc", 3, 0, &ids, &n, err, sizeof err), BN_EFORMAT);
    CHECK(ids == NULL && n == 0 && strstr(err, "0x63"));
    CHECK_EQ_INT(bn_tokenizer_encode(t, "\xe2\x82\xac", 3, 0, &ids, &n, err, sizeof err), BN_EFORMAT);
    CHECK_EQ_INT(bn_tokenizer_piece(t, 3, b, sizeof b), 3); /* as stored */
    bn_tokenizer_destroy(&t);
    vocab_free(&v);
}

/* ---- speed ------------------------------------------------------------------------ */

/* 1 MB of English-like text (words, punctuation, numbers, newlines): encoded and
 * round-tripped. Prints the rate; asserts nothing about time. */
BN_TEST(tokenizer_speed)
{
    static const char *words[] = {
        "the", "engine", "reads", "weights", "from", "a", "file", "and", "splits", "layers", "across",
        "nodes", "of", "cluster", "token", "model", "quick", "brown", "fox", "jumps", "over", "lazy",
        "dog", "it's", "we'll", "They're", "Hello", "world", "inference", "distributed", "ternary",
    };
    uint64_t seed = bn_test_seed();
    size_t cap = 1 << 20, n = 0;
    char *text = malloc(cap + 64);
    while (n < cap) {
        uint64_t r = rng_next(&seed);
        const char *w = words[r % (sizeof words / sizeof words[0])];
        size_t wl = strlen(w);
        memcpy(text + n, w, wl);
        n += wl;
        r >>= 8;
        if (r % 17 == 0)
            n += (size_t)sprintf(text + n, " %u", (unsigned)(r >> 8) % 100000);
        text[n++] = r % 11 == 0 ? ',' : r % 13 == 0 ? '.' : r % 29 == 0 ? '\n' : ' ';
    }
    vocab_t v;
    vocab_load(FIX "tiny-b158-i2_s.gguf", &v);
    bn_tokenizer_t *t = tok_new(&v.p);
    double t0 = now_s();
    size_t n_ids;
    int32_t *ids = encode(t, text, n, 1, &n_ids);
    double dt = now_s() - t0;
    fprintf(stderr, "  encoded %zu bytes into %zu tokens in %.3f s (%.1f MB/s)\n", n, n_ids, dt,
            n / 1e6 / (dt > 0 ? dt : 1e-9));
    size_t len;
    char *back = stream(t, ids, n_ids, &len);
    check_bytes("1 MB round trip", back, len, text, n);
    free(back);
    free(ids);
    free(text);
    bn_tokenizer_destroy(&t);
    vocab_free(&v);
}
