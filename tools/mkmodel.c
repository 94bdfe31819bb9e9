/* mkmodel.c - bitnet-mkmodel: write a BitNet b1.58 GGUF model with random ternary
 * weights, deterministic from a seed.
 *
 * What it is: a generator of test and benchmark models with the layout, keys and
 * tokenizer of Microsoft's 2B4T file (or of the tiny test fixtures), at any size.
 * What it is not: a trained model - the text it produces is gibberish.
 *
 * Invariants:
 * - Every random value comes from a stream derived from (seed, tensor name, row),
 *   so the same seed gives the same trits, scales, norms and embedding floats in
 *   every weight and embedding type, whatever the thread count; only the packing
 *   differs. The same flags give byte-identical files.
 * - Tensors are generated and written one at a time (the embedding a chunk of rows
 *   at a time), so the 2B4T shape needs a few tens of MB, not the file's size.
 *
 * Weights (as the fixtures, tests/fixtures/README.md): trits uniform over
 * {-1,0,+1}; one scale per tensor s = f16(1/sqrt(2/3 n_in) U(0.9,1.1)); norms
 * 1 + 0.1 N(0,1) (F32); embedding N(0, 1/n_embd). I2_S stores s as its f32 tail,
 * TQ types store d = s in every block; a TQ ffn_down whose rows (n_ff) are not a
 * multiple of 256 is written as F16 values w*s (exact, since s is an f16).
 *
 * Vocabulary: 256 byte tokens in GPT-2 byte-to-unicode order, then merges learned
 * by byte-level BPE on the English text below (then, if the vocabulary is larger
 * than that text supports, synthetic merges: an existing token plus one letter),
 * then LLaMA-3-style special tokens of type CONTROL at the top. */
#include "kernels/quants.h"
#include "kernels/ref/pack.h"
#include "base/status.h"
#include "tools/gguf_write.h"
#include "worker/gguf.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define PROG "bitnet-mkmodel"
#define MAX_THREADS 16
#define TOKEN_NORMAL 1
#define TOKEN_CONTROL 3

/* ---------------------------------------------------------------- config */

typedef struct {
    const char *preset, *arch, *out;
    uint32_t wtype, embd_type;       /* BN_TYPE_* */
    const char *wtype_name, *embd_name;
    uint64_t seed;
    uint32_t n_embd, n_layer, n_ff, n_head, n_head_kv, n_vocab, n_ctx;
    float rope_base, rms_eps;
    int threads;
} config_t;

static const struct { const char *name; uint32_t type, file_type; } wtypes[] = {
    { "i2_s", BN_TYPE_I2_S, 40 }, { "tq2_0", BN_TYPE_TQ2_0, 37 }, { "tq1_0", BN_TYPE_TQ1_0, 36 },
};
static const struct { const char *name; uint32_t type; } embd_types[] = {
    { "f16", BN_TYPE_F16 }, { "f32", BN_TYPE_F32 }, { "q8_0", BN_TYPE_Q8_0 },
    { "q6_k", BN_TYPE_Q6_K }, { "q4_0", BN_TYPE_Q4_0 },
};
static const char *const archs[] = { "bitnet-b1.58", "bitnet-25", "bitnet" };

static void usage(FILE *f)
{
    fprintf(f,
        "usage: " PROG " [flags] -o FILE\n"
        "Write a BitNet b1.58 GGUF v3 model with random ternary weights (deterministic from --seed).\n"
        "\n"
        "  --preset tiny|2b4t     shapes to start from (default tiny); the flags below override them\n"
        "                         tiny: hidden 256, 4 layers, FFN 640, 8 heads, 2 KV heads, vocab 512\n"
        "                         2b4t: hidden 2560, 30 layers, FFN 6912, 20 heads, 5 KV heads, vocab 128256\n"
        "  --arch NAME            bitnet-b1.58 (default), bitnet-25 or bitnet (adds tokenizer.ggml.pre)\n"
        "  --wtype T              ternary type: i2_s (default), tq2_0, tq1_0\n"
        "  --embd-type T          token_embd type: f16 (default), f32, q8_0, q6_k, q4_0\n"
        "  --seed N               random seed (default 1); the same seed gives the same weights in every type\n"
        "  -o, --output FILE      output file (required)\n"
        "  --n-embd N             hidden size (embedding_length)\n"
        "  --n-layer N            number of layers (block_count)\n"
        "  --n-ff N               FFN size (feed_forward_length)\n"
        "  --n-head N             query heads; head_dim = n_embd / n_head = rope.dimension_count\n"
        "  --n-head-kv N          key/value heads (must divide --n-head)\n"
        "  --n-vocab N            vocabulary size (at least 272)\n"
        "  --n-ctx N              context_length\n"
        "  --rope-base X          rope.freq_base\n"
        "  --rms-eps X            attention.layer_norm_rms_epsilon\n"
        "  --threads N            worker threads (default: online CPUs, at most %d); output does not depend on it\n"
        "  -h, --help             this text\n"
        "Row lengths: i2_s needs --n-embd and --n-ff multiples of 128; tq2_0/tq1_0 need --n-embd a multiple\n"
        "of 256 (an --n-ff that is not gets an F16 ffn_down); q8_0/q4_0 need --n-embd a multiple of 32, q6_k of 256.\n"
        "Exit status: 0 written, 1 failed (I/O, memory), 2 bad flags.\n", MAX_THREADS);
}

static void preset_tiny(config_t *c)
{
    c->n_embd = 256; c->n_layer = 4; c->n_ff = 640; c->n_head = 8; c->n_head_kv = 2;
    c->n_vocab = 512; c->n_ctx = 4096; c->rope_base = 500000.0f; c->rms_eps = 1e-5f;
}

static void preset_2b4t(config_t *c)
{
    c->n_embd = 2560; c->n_layer = 30; c->n_ff = 6912; c->n_head = 20; c->n_head_kv = 5;
    c->n_vocab = 128256; c->n_ctx = 4096; c->rope_base = 500000.0f; c->rms_eps = 1e-5f;
}

/* Bad flags: one line naming the flag, then the caller exits 2. Returns 0. */
static int bad(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int bad(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs(" (see --help)\n", stderr);
    va_end(ap);
    return 0;
}

static int parse_u64(const char *flag, const char *s, uint64_t *v)
{
    char *end;
    errno = 0;
    if (!s || !*s || *s == '-' || *s == '+' || *s == ' ')
        return bad("%s: '%s' is not a non-negative integer", flag, s ? s : "");
    unsigned long long x = strtoull(s, &end, 10);
    if (*end || errno)
        return bad("%s: '%s' is not a non-negative integer", flag, s);
    *v = x;
    return 1;
}

/* A positive integer no larger than max. */
static int parse_dim(const char *flag, const char *s, uint32_t max, uint32_t *v)
{
    uint64_t x;
    if (!parse_u64(flag, s, &x))
        return 0;
    if (x == 0)
        return bad("%s: must be positive, not 0", flag);
    if (x > max)
        return bad("%s: %llu is too large (at most %u)", flag, (unsigned long long)x, max);
    *v = (uint32_t)x;
    return 1;
}

static int parse_pos_float(const char *flag, const char *s, float *v)
{
    char *end;
    errno = 0;
    float x = s && *s ? strtof(s, &end) : 0.0f;
    if (!s || !*s || *end || errno || !isfinite(x))
        return bad("%s: '%s' is not a finite number", flag, s ? s : "");
    if (!(x > 0.0f))
        return bad("%s: must be positive, not %s", flag, s);
    *v = x;
    return 1;
}

/* Flags take their value as the next argument or after '='. */
static const char *flag_value(int argc, char **argv, int *i, const char *arg, size_t flen)
{
    if (arg[flen] == '=')
        return arg + flen + 1;
    if (*i + 1 < argc)
        return argv[++*i];
    return NULL;
}

/* Returns 1 to go on, 0 on a bad flag (message printed), -1 after --help. */
static int parse_args(int argc, char **argv, config_t *c)
{
    memset(c, 0, sizeof *c);
    c->preset = "tiny";
    c->arch = archs[0];
    c->wtype = BN_TYPE_I2_S;
    c->wtype_name = "i2_s";
    c->embd_type = BN_TYPE_F16;
    c->embd_name = "f16";
    c->seed = 1;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    c->threads = ncpu < 1 ? 1 : ncpu > MAX_THREADS ? MAX_THREADS : (int)ncpu;

    /* The preset first, wherever it is, so that the other flags override it. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return -1;
        }
        if (strncmp(argv[i], "--preset", 8) == 0 && (argv[i][8] == 0 || argv[i][8] == '=')) {
            const char *v = flag_value(argc, argv, &i, argv[i], 8);
            if (!v)
                return bad("--preset: missing value");
            if (strcmp(v, "tiny") != 0 && strcmp(v, "2b4t") != 0)
                return bad("--preset: unknown preset '%s' (tiny or 2b4t)", v);
            c->preset = v;
        }
    }
    if (strcmp(c->preset, "2b4t") == 0)
        preset_2b4t(c);
    else
        preset_tiny(c);

    static const struct { const char *flag; size_t off; uint32_t max; } dims[] = {
        { "--n-embd", offsetof(config_t, n_embd), 1u << 16 },
        { "--n-layer", offsetof(config_t, n_layer), 1024 },
        { "--n-ff", offsetof(config_t, n_ff), 1u << 18 },
        { "--n-head", offsetof(config_t, n_head), 1u << 12 },
        { "--n-head-kv", offsetof(config_t, n_head_kv), 1u << 12 },
        { "--n-vocab", offsetof(config_t, n_vocab), 1u << 22 },
        { "--n-ctx", offsetof(config_t, n_ctx), 1u << 24 },
    };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *eq = strchr(a, '=');
        size_t flen = eq && a[0] == '-' && a[1] == '-' ? (size_t)(eq - a) : strlen(a);
        char flag[64];
        snprintf(flag, sizeof flag, "%.*s", (int)(flen < 63 ? flen : 63), a);
#define IS(name) (strcmp(flag, name) == 0)
        if (!(IS("--preset") || IS("--arch") || IS("--wtype") || IS("--embd-type") || IS("--seed") ||
              IS("-o") || IS("--output") || IS("--rope-base") || IS("--rms-eps") || IS("--threads"))) {
            size_t d;
            for (d = 0; d < sizeof dims / sizeof dims[0]; d++)
                if (IS(dims[d].flag))
                    break;
            if (d == sizeof dims / sizeof dims[0])
                return bad("unknown flag '%s'", a);
        }
        const char *v = flag_value(argc, argv, &i, a, flen);
        if (!v)
            return bad("%s: missing value", flag);
        if (IS("--preset")) {
            continue; /* done above */
        } else if (IS("--arch")) {
            size_t k;
            for (k = 0; k < sizeof archs / sizeof archs[0] && strcmp(v, archs[k]) != 0; k++)
                ;
            if (k == sizeof archs / sizeof archs[0])
                return bad("--arch: unknown architecture '%s' (bitnet-b1.58, bitnet-25 or bitnet)", v);
            c->arch = archs[k];
        } else if (IS("--wtype")) {
            size_t k;
            for (k = 0; k < sizeof wtypes / sizeof wtypes[0] && strcmp(v, wtypes[k].name) != 0; k++)
                ;
            if (k == sizeof wtypes / sizeof wtypes[0])
                return bad("--wtype: unknown type '%s' (i2_s, tq2_0 or tq1_0)", v);
            c->wtype = wtypes[k].type;
            c->wtype_name = wtypes[k].name;
        } else if (IS("--embd-type")) {
            size_t k;
            for (k = 0; k < sizeof embd_types / sizeof embd_types[0] && strcmp(v, embd_types[k].name) != 0; k++)
                ;
            if (k == sizeof embd_types / sizeof embd_types[0])
                return bad("--embd-type: unknown type '%s' (f16, f32, q8_0, q6_k or q4_0)", v);
            c->embd_type = embd_types[k].type;
            c->embd_name = embd_types[k].name;
        } else if (IS("--seed")) {
            if (!parse_u64("--seed", v, &c->seed))
                return 0;
        } else if (IS("-o") || IS("--output")) {
            if (!*v)
                return bad("%s: empty file name", flag);
            c->out = v;
        } else if (IS("--rope-base")) {
            if (!parse_pos_float("--rope-base", v, &c->rope_base))
                return 0;
        } else if (IS("--rms-eps")) {
            if (!parse_pos_float("--rms-eps", v, &c->rms_eps))
                return 0;
        } else if (IS("--threads")) {
            uint32_t t;
            if (!parse_dim("--threads", v, MAX_THREADS, &t))
                return 0;
            c->threads = (int)t;
        } else {
            for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++)
                if (IS(dims[d].flag) && !parse_dim(dims[d].flag, v, dims[d].max, (uint32_t *)((char *)c + dims[d].off)))
                    return 0;
        }
#undef IS
    }
    if (!c->out)
        return bad("-o: no output file given");

    /* Shapes the model and the types can hold. */
    if (c->n_embd % c->n_head != 0)
        return bad("--n-head: %u does not divide --n-embd %u", c->n_head, c->n_embd);
    if ((c->n_embd / c->n_head) % 2 != 0)
        return bad("--n-head: head_dim = %u / %u = %u is odd (RoPE rotates pairs)",
                   c->n_embd, c->n_head, c->n_embd / c->n_head);
    if (c->n_head % c->n_head_kv != 0)
        return bad("--n-head-kv: %u does not divide --n-head %u", c->n_head_kv, c->n_head);
    if (c->n_vocab < 256 + 16)
        return bad("--n-vocab: %u is too small (256 byte tokens + 16 specials = 272 at least)", c->n_vocab);
    uint32_t wblk = bn_type_block(c->wtype);
    if (c->n_embd % wblk != 0)
        return bad("--n-embd: %u is not a multiple of %u, which %s rows need", c->n_embd, wblk, c->wtype_name);
    if (c->wtype == BN_TYPE_I2_S && c->n_ff % wblk != 0)
        return bad("--n-ff: %u is not a multiple of %u, which i2_s rows (ffn_down) need", c->n_ff, wblk);
    uint32_t eblk = bn_type_block(c->embd_type);
    if (c->n_embd % eblk != 0)
        return bad("--n-embd: %u is not a multiple of %u, which --embd-type %s rows need",
                   c->n_embd, eblk, c->embd_name);
    return 1;
}

/* ---------------------------------------------------------------- random */

/* splitmix64 (Steele, Lea, Flood 2014): seeds the streams. */
static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* xoshiro256** (Blackman, Vigna 2018): the generator of every stream. */
typedef struct { uint64_t s[4]; } rng_t;

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t rng_next(rng_t *r)
{
    uint64_t *s = r->s, out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

/* Uniform in [0, 1) with 53 bits. */
static inline double rng_unif(rng_t *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

/* The key of a tensor: its name hashed (FNV-1a) and mixed with the seed. */
static uint64_t tensor_key(uint64_t seed, const char *name)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const char *p = name; *p; p++)
        h = (h ^ (uint8_t)*p) * 0x100000001b3ull;
    uint64_t s = seed;
    return h ^ splitmix64(&s);
}

/* Stream `idx` of a tensor: 0 for the tensor's scale, 1 + r for row r. */
static rng_t rng_stream(uint64_t key, uint64_t idx)
{
    uint64_t s = key + idx * 0xd1342543de82ef95ull;
    rng_t r;
    for (int i = 0; i < 4; i++)
        r.s[i] = splitmix64(&s);
    return r;
}

/* n trits, uniform over {-1,0,1}: each 32-bit half of a draw, read as a fraction
 * in [0,1), gives 10 base-3 digits (digit = floor(3f), f = frac(3f)). The bias per
 * pattern is below 3^10/2^32 = 1.4e-5 relative: irrelevant for random weights, and
 * 20 trits per draw keep the 2B4T shape's 2e9 trits fast. */
static void gen_trits(rng_t *r, int8_t *w, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint64_t x = rng_next(r);
        for (int half = 0; half < 2; half++) {
            uint32_t f = (uint32_t)(x >> (32 * half));
            for (int k = 0; k < 10 && i < n; k++) {
                uint64_t p = (uint64_t)f * 3;
                w[i++] = (int8_t)((int)(p >> 32) - 1);
                f = (uint32_t)p;
            }
        }
    }
}

/* n normal values N(0, sd^2), Box-Muller on pairs. */
static void gen_normal(rng_t *r, float *x, size_t n, double mean, double sd)
{
    for (size_t i = 0; i < n; i += 2) {
        double u1 = 1.0 - rng_unif(r), u2 = rng_unif(r); /* u1 in (0, 1]: log is finite */
        double rad = sqrt(-2.0 * log(u1)), th = 2.0 * M_PI * u2;
        x[i] = (float)(mean + sd * rad * cos(th));
        if (i + 1 < n)
            x[i + 1] = (float)(mean + sd * rad * sin(th));
    }
}

/* ---------------------------------------------------------------- vocabulary */

/* Our own English text, the corpus the BPE merges are learned from. */
static const char corpus[] =
    "The harbour town wakes before the sun. Fishing boats leave the quay at four, and by the time the "
    "bakery opens its shutters the gulls are already arguing over the first crates of the day. People "
    "here say that the weather is the only boss they have ever had, and they mean it: when the wind "
    "turns to the north, nobody argues, they simply stay at home and mend their nets.\n"
    "On the hill above the harbour there is a small school with twelve pupils and one teacher. She "
    "teaches reading in the morning and numbers after lunch, and on Fridays she takes the children down "
    "to the rocks to count crabs. Last year they counted 317 of them, which was a record, although "
    "the older boys still claim that some crabs were counted twice because they moved between pools.\n"
    "A language model is a program that reads a piece of text and guesses what comes next. It does not "
    "know what a harbour is, or why crabs move between pools; it has only seen how words follow each "
    "other in a great many sentences. Still, if you give it the first half of a sentence, it can often "
    "write a second half that sounds right, and sometimes it is even correct.\n"
    "To make such a model small and fast, every weight can be limited to three values: minus one, zero "
    "and plus one. Multiplying by those values is easy, because it only means adding, subtracting or "
    "skipping a number. The model then needs far less memory, and a computer with an ordinary processor "
    "can run it at a useful speed without any special hardware.\n"
    "Before a model can read, its text has to be split into tokens. A tokenizer starts from single "
    "bytes and learns which pairs appear together most often, then joins them into new tokens, again "
    "and again, until the list of tokens is long enough. Common words like the, and, of and to become "
    "single tokens early, while rare words stay in pieces.\n"
    "In winter the harbour is quiet. The boats are pulled up on the slipway, their hulls scraped and "
    "painted, and the old men sit in the cafe by the window, watching the rain and telling the same "
    "stories they told last winter. Nobody minds; the stories get a little better every year.\n"
    "\"Where are you going?\" asked the teacher. \"To the lighthouse,\" said the girl, \"because my "
    "grandfather keeps the lamp, and he said I could help him clean the glass tonight.\" It's a long "
    "walk, and the path is steep, but she'd walked it many times and wasn't afraid of the dark.\n"
    "The lighthouse was built in 1887 from grey stone. Its lamp turns once every ten seconds, and on a "
    "clear night its light can be seen from twenty miles out at sea. Ships have not needed it for many "
    "years, since every one of them now carries a satellite receiver, but the town would not hear of "
    "switching it off. A light that has shone for so long, they say, should be allowed to keep shining.\n";

/* GPT-2's byte-to-unicode map: printable bytes stand for themselves, the other
 * 68 bytes are moved to U+0100 and up, in byte order. Token ids 0..255 list the
 * printable bytes first, then the others, each group in byte order. */
static int byte_printable(int b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174; }

static void byte_tokens(uint8_t order[256], unsigned cp[256])
{
    int id = 0;
    for (int b = 0; b < 256; b++)
        if (byte_printable(b))
            order[id++] = (uint8_t)b;
    for (int b = 0, k = 0; b < 256; b++)
        if (!byte_printable(b)) {
            order[id++] = (uint8_t)b;
            cp[b] = 256 + (unsigned)k++;
        } else {
            cp[b] = (unsigned)b;
        }
}

typedef struct {
    char **text;       /* (n) token texts, byte-to-unicode mapped, NUL-terminated */
    int32_t *type;     /* (n) TOKEN_NORMAL or TOKEN_CONTROL */
    uint32_t n, cap;
    char **merges;     /* (n_merges) "left right" */
    uint32_t n_merges, merges_cap;
    uint32_t *slot;    /* hash set of texts: token id + 1, 0 = empty */
    uint32_t slot_mask;
    uint32_t byte_id[256]; /* token id of each byte */
    uint32_t bos, eos;
} vocab_t;

static uint64_t str_hash(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

/* Id of a token text, or -1. */
static int64_t vocab_find(const vocab_t *v, const char *s)
{
    for (uint64_t i = str_hash(s) & v->slot_mask;; i = (i + 1) & v->slot_mask) {
        uint32_t id = v->slot[i];
        if (id == 0)
            return -1;
        if (strcmp(v->text[id - 1], s) == 0)
            return id - 1;
    }
}

/* Appends a token (takes ownership of s). The set is sized for the whole
 * vocabulary up front, so it never fills. */
static uint32_t vocab_add(vocab_t *v, char *s, int32_t type)
{
    uint32_t id = v->n++;
    v->text[id] = s;
    v->type[id] = type;
    uint64_t i = str_hash(s) & v->slot_mask;
    while (v->slot[i])
        i = (i + 1) & v->slot_mask;
    v->slot[i] = id + 1;
    return id;
}

static int vocab_add_merge(vocab_t *v, uint32_t a, uint32_t b)
{
    if (v->n_merges == v->merges_cap) {
        uint32_t cap = v->merges_cap ? 2 * v->merges_cap : 1024;
        char **m = realloc(v->merges, cap * sizeof *m);
        if (!m)
            return 0;
        v->merges = m;
        v->merges_cap = cap;
    }
    size_t la = strlen(v->text[a]), lb = strlen(v->text[b]);
    char *m = malloc(la + lb + 2);
    if (!m)
        return 0;
    memcpy(m, v->text[a], la);
    m[la] = ' ';
    memcpy(m + la + 1, v->text[b], lb + 1);
    v->merges[v->n_merges++] = m;
    return 1;
}

static char *concat(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *s = malloc(la + lb + 1);
    if (s) {
        memcpy(s, a, la);
        memcpy(s + la, b, lb + 1);
    }
    return s;
}

/* Merge (a, b): record it and add the joined text as a token unless it already is
 * one (BPE can reach one text by two routes). Returns the merged id, or -1 on ENOMEM. */
static int64_t vocab_merge(vocab_t *v, uint32_t a, uint32_t b)
{
    char *s = concat(v->text[a], v->text[b]);
    if (!s || !vocab_add_merge(v, a, b)) {
        free(s);
        return -1;
    }
    int64_t id = vocab_find(v, s);
    if (id >= 0) {
        free(s);
        return id;
    }
    return vocab_add(v, s, TOKEN_NORMAL);
}

static void vocab_free(vocab_t *v)
{
    for (uint32_t i = 0; i < v->n; i++)
        free(v->text[i]);
    for (uint32_t i = 0; i < v->n_merges; i++)
        free(v->merges[i]);
    free(v->text);
    free(v->type);
    free(v->merges);
    free(v->slot);
    memset(v, 0, sizeof *v);
}

static int is_letter(int c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static int is_digit(int c) { return c >= '0' && c <= '9'; }
static int is_space(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
static int is_nl(int c) { return c == '\n' || c == '\r'; }

/* Length of the pre-token at s (ASCII only, which our corpus is): the LLaMA-3
 * pre-tokenizer's alternatives, in its order, so that the merges we learn are the
 * ones its pieces can use. */
static size_t pretoken_len(const char *s)
{
    static const char *const contractions[] = { "'s", "'t", "'re", "'ve", "'m", "'ll", "'d" };
    size_t i = 0;
    int c = (uint8_t)s[0];
    if (c == '\'')
        for (size_t k = 0; k < sizeof contractions / sizeof contractions[0]; k++) {
            size_t n = strlen(contractions[k]);
            if (strncasecmp(s, contractions[k], n) == 0)
                return n;
        }
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (is_letter(c) || (!is_nl(c) && !is_digit(c) && is_letter((uint8_t)s[1]))) {
        i = is_letter(c) ? 0 : 1;
        while (is_letter((uint8_t)s[i]))
            i++;
        return i;
    }
    /* \p{N}{1,3} */
    if (is_digit(c)) {
        while (i < 3 && is_digit((uint8_t)s[i]))
            i++;
        return i;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t p = c == ' ' ? 1 : 0;
    int pc = (uint8_t)s[p];
    if (pc && !is_space(pc) && !is_letter(pc) && !is_digit(pc)) {
        i = p;
        while (s[i] && !is_space((uint8_t)s[i]) && !is_letter((uint8_t)s[i]) && !is_digit((uint8_t)s[i]))
            i++;
        while (is_nl((uint8_t)s[i]))
            i++;
        return i;
    }
    /* \s*[\r\n]+ : up to the last newline of the whitespace run */
    size_t end = 0, last_nl = 0;
    while (is_space((uint8_t)s[end])) {
        if (is_nl((uint8_t)s[end]))
            last_nl = end + 1;
        end++;
    }
    if (last_nl)
        return last_nl;
    /* \s+(?!\S) then \s+ : a run of spaces leaves its last one to the next word */
    if (end > 1 && s[end])
        return end - 1;
    return end ? end : 1;
}

/* A pre-token of the corpus: its symbols (token ids) and how often it occurs. */
typedef struct {
    uint32_t *sym;
    uint32_t n, count;
} word_t;

typedef struct {
    uint64_t *key;   /* (a << 32 | b) + 1, 0 = empty */
    uint32_t *count;
    uint64_t mask;
} pairs_t;

static void pairs_add(pairs_t *p, uint32_t a, uint32_t b, uint32_t c)
{
    uint64_t k = ((uint64_t)a << 32 | b) + 1;
    uint64_t i = (k * 0x9e3779b97f4a7c15ull >> 20) & p->mask;
    while (p->key[i] && p->key[i] != k)
        i = (i + 1) & p->mask;
    p->key[i] = k;
    p->count[i] += c;
}

/* Learns merges on the corpus until the vocabulary has `target` tokens or no pair
 * is left. Each step merges the most frequent adjacent pair; ties go to the pair
 * whose texts sort first, so the result is deterministic. Returns 0 on ENOMEM. */
static int learn_bpe(vocab_t *v, uint32_t target)
{
    /* Pre-tokenize and count distinct words (the corpus is small: linear search). */
    word_t *words = NULL;
    uint32_t n_words = 0, total_syms = 0;
    int ok = 1;
    const size_t clen = sizeof corpus - 1;
    words = calloc(clen, sizeof *words);
    if (!words)
        return 0;
    for (size_t i = 0; i < clen;) {
        size_t n = pretoken_len(corpus + i);
        uint32_t w;
        for (w = 0; w < n_words; w++)
            if (words[w].n == n) {
                size_t k;
                for (k = 0; k < n && words[w].sym[k] == v->byte_id[(uint8_t)corpus[i + k]]; k++)
                    ;
                if (k == n)
                    break;
            }
        if (w == n_words) {
            if (!(words[w].sym = malloc(n * sizeof(uint32_t)))) {
                ok = 0;
                break;
            }
            for (size_t k = 0; k < n; k++)
                words[w].sym[k] = v->byte_id[(uint8_t)corpus[i + k]];
            words[w].n = (uint32_t)n;
            n_words++;
            total_syms += (uint32_t)n;
        }
        words[w].count++;
        i += n;
    }
    pairs_t p = { 0 };
    uint64_t cap = 1;
    while (cap < 2 * (uint64_t)total_syms + 2)
        cap *= 2;
    p.mask = cap - 1;
    if (ok && (!(p.key = malloc(cap * sizeof *p.key)) || !(p.count = malloc(cap * sizeof *p.count))))
        ok = 0;
    while (ok && v->n < target) {
        memset(p.key, 0, cap * sizeof *p.key);
        memset(p.count, 0, cap * sizeof *p.count);
        for (uint32_t w = 0; w < n_words; w++)
            for (uint32_t k = 0; k + 1 < words[w].n; k++)
                pairs_add(&p, words[w].sym[k], words[w].sym[k + 1], words[w].count);
        uint64_t best = 0;
        uint32_t best_c = 0;
        for (uint64_t i = 0; i <= p.mask; i++) {
            if (!p.key[i] || p.count[i] < best_c)
                continue;
            if (p.count[i] == best_c) {
                uint32_t a = (uint32_t)((p.key[i] - 1) >> 32), b = (uint32_t)(p.key[i] - 1);
                uint32_t ba = (uint32_t)((best - 1) >> 32), bb = (uint32_t)(best - 1);
                int c = strcmp(v->text[a], v->text[ba]);
                if (c > 0 || (c == 0 && strcmp(v->text[b], v->text[bb]) >= 0))
                    continue;
            }
            best = p.key[i];
            best_c = p.count[i];
        }
        if (!best_c)
            break; /* every word is one token */
        uint32_t a = (uint32_t)((best - 1) >> 32), b = (uint32_t)(best - 1);
        int64_t m = vocab_merge(v, a, b);
        if (m < 0) {
            ok = 0;
            break;
        }
        for (uint32_t w = 0; w < n_words; w++) {
            uint32_t *s = words[w].sym, o = 0;
            for (uint32_t k = 0; k < words[w].n; k++) {
                if (k + 1 < words[w].n && s[k] == a && s[k + 1] == b) {
                    s[o++] = (uint32_t)m;
                    k++;
                } else {
                    s[o++] = s[k];
                }
            }
            words[w].n = o;
        }
    }
    free(p.key);
    free(p.count);
    for (uint32_t w = 0; w < n_words; w++)
        free(words[w].sym);
    free(words);
    return ok;
}

/* Fills the regular part up to `target` with synthetic merges: an existing token
 * plus one letter, tokens taken in id order (so new tokens grow by one letter at a
 * time), skipping texts that exist. Each is a valid merge of two tokens. */
static int synth_merges(vocab_t *v, uint32_t target)
{
    static const char letters[] = "etaoinsrhldcumfpgwybvkxjqz";
    for (uint32_t a = 0; v->n < target; a++) {
        if (a >= v->n)
            return 0; /* cannot happen: the longest token plus a letter is always new */
        for (const char *l = letters; *l && v->n < target; l++) {
            uint32_t b = v->byte_id[(uint8_t)*l];
            char *s = concat(v->text[a], v->text[b]);
            if (!s)
                return 0;
            int exists = vocab_find(v, s) >= 0;
            free(s);
            if (!exists && vocab_merge(v, a, b) < 0)
                return 0;
        }
    }
    return 1;
}

/* The LLaMA-3 special tokens: 11 named, then reserved ones numbered on from 3. */
static char *special_name(uint32_t k)
{
    static const char *const named[] = {
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    };
    char buf[64];
    if (k < sizeof named / sizeof named[0])
        snprintf(buf, sizeof buf, "%s", named[k]);
    else
        snprintf(buf, sizeof buf, "<|reserved_special_token_%u|>", k - 8);
    return strdup(buf);
}

/* Encodes code point cp (< 0x800) as UTF-8; returns the length. */
static int utf8(unsigned cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xc0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
}

/* The whole vocabulary: bytes, learned and synthetic merges, specials. 16 specials
 * for small vocabularies (as the fixtures), 256 from 64K tokens up (as LLaMA-3,
 * where 128000 regular tokens are followed by 256 specials). */
static int build_vocab(vocab_t *v, uint32_t n_vocab, char *err, size_t errlen)
{
    memset(v, 0, sizeof *v);
    uint32_t n_special = n_vocab >= 65536 ? 256 : 16;
    uint32_t n_regular = n_vocab - n_special;
    uint64_t slots = 1;
    while (slots < 2 * (uint64_t)n_vocab)
        slots *= 2;
    v->cap = n_vocab;
    v->text = calloc(n_vocab, sizeof *v->text);
    v->type = calloc(n_vocab, sizeof *v->type);
    v->slot = calloc(slots, sizeof *v->slot);
    v->slot_mask = (uint32_t)(slots - 1);
    if (!v->text || !v->type || !v->slot)
        goto nomem;
    uint8_t order[256];
    unsigned cp[256];
    byte_tokens(order, cp);
    for (int i = 0; i < 256; i++) {
        char buf[4];
        int n = utf8(cp[order[i]], buf);
        buf[n] = 0;
        char *s = strdup(buf);
        if (!s)
            goto nomem;
        v->byte_id[order[i]] = vocab_add(v, s, TOKEN_NORMAL);
    }
    if (!learn_bpe(v, n_regular) || !synth_merges(v, n_regular))
        goto nomem;
    for (uint32_t k = 0; k < n_special; k++) {
        char *s = special_name(k);
        if (!s)
            goto nomem;
        vocab_add(v, s, TOKEN_CONTROL);
    }
    v->bos = n_regular;
    v->eos = n_regular + 1;
    return BN_OK;
nomem:
    vocab_free(v);
    return bn_err(err, errlen, BN_ENOMEM, "out of memory building the vocabulary");
}

/* ---------------------------------------------------------------- tensors */

typedef enum { KIND_EMBD, KIND_NORM, KIND_TERNARY } kind_t;

typedef struct gen gen_t;

typedef struct {
    char name[64];
    kind_t kind;
    uint32_t type;        /* as written */
    uint64_t ne0, ne1;
    uint64_t nbytes;
    gen_t *g;
} spec_t;

/* Shared by the fill callbacks: configuration and scratch buffers (sized for the
 * largest tensor, allocated on first use). */
struct gen {
    const config_t *c;
    int8_t *trits;        /* (largest ternary n) */
    uint8_t *packed;      /* (largest ternary nbytes) */
    float *rows;          /* (EMBD_CHUNK, n_embd) */
    uint8_t *qrows;       /* (EMBD_CHUNK rows of the embedding type) */
    uint64_t max_n, max_bytes;
};

#define EMBD_CHUNK 256

/* Runs fn(ctx, r0, r1) over [0, n) split into nth contiguous ranges, one thread
 * each (the caller's thread takes the first). Results never depend on nth: each
 * row is a pure function of its index. */
typedef void (*range_fn)(void *ctx, uint64_t r0, uint64_t r1);

typedef struct { range_fn fn; void *ctx; uint64_t r0, r1; } range_job_t;

static void *range_thread(void *p)
{
    range_job_t *j = p;
    j->fn(j->ctx, j->r0, j->r1);
    return NULL;
}

static void parallel_rows(int nth, range_fn fn, void *ctx, uint64_t n)
{
    if (nth > MAX_THREADS)
        nth = MAX_THREADS;
    if ((uint64_t)nth > n)
        nth = n ? (int)n : 1;
    range_job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = { 0 };
    for (int t = 0; t < nth; t++)
        jobs[t] = (range_job_t){ fn, ctx, n * (uint64_t)t / (uint64_t)nth, n * (uint64_t)(t + 1) / (uint64_t)nth };
    for (int t = 1; t < nth; t++)
        started[t] = pthread_create(&tid[t], NULL, range_thread, &jobs[t]) == 0;
    fn(ctx, jobs[0].r0, jobs[0].r1);
    for (int t = 1; t < nth; t++) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            fn(ctx, jobs[t].r0, jobs[t].r1); /* no thread: do its share here */
    }
}

/* The tensor's scale: f16(1/sqrt(2/3 n_in) * U(0.9, 1.1)) from stream 0. */
static float ternary_scale(uint64_t key, uint64_t n_in)
{
    rng_t r = rng_stream(key, 0);
    double u = 0.9 + 0.2 * rng_unif(&r);
    return bn_fp16_to_f32(bn_f32_to_fp16((float)(u / sqrt(2.0 / 3.0 * (double)n_in))));
}

typedef struct {
    const spec_t *s;
    uint64_t key;
    float scale;
    int8_t *trits;
    uint8_t *out;
    uint64_t row0;        /* embedding: first row of the chunk */
    float *rows;
} job_t;

static void trit_rows(void *p, uint64_t r0, uint64_t r1)
{
    job_t *j = p;
    for (uint64_t r = r0; r < r1; r++) {
        rng_t rng = rng_stream(j->key, 1 + r);
        gen_trits(&rng, j->trits + r * j->s->ne0, j->s->ne0);
    }
}

/* TQ types and the F16 fallback pack row by row, so they run in parallel too. */
static void pack_rows(void *p, uint64_t r0, uint64_t r1)
{
    job_t *j = p;
    const spec_t *s = j->s;
    uint64_t rb = s->nbytes / s->ne1; /* bytes per row: exact for these types */
    for (uint64_t r = r0; r < r1; r++) {
        const int8_t *w = j->trits + r * s->ne0;
        uint8_t *o = j->out + r * rb;
        if (s->type == BN_TYPE_TQ2_0) {
            bn_pack_tq2_0(w, s->ne0, j->scale, (bn_block_tq2_0 *)o);
        } else if (s->type == BN_TYPE_TQ1_0) {
            bn_pack_tq1_0(w, s->ne0, j->scale, (bn_block_tq1_0 *)o);
        } else { /* F16: w * s is exact in half precision */
            bn_fp16_t h = bn_f32_to_fp16(j->scale), nh = bn_f32_to_fp16(-j->scale), z = 0;
            for (uint64_t i = 0; i < s->ne0; i++) {
                bn_fp16_t v = w[i] > 0 ? h : w[i] < 0 ? nh : z;
                memcpy(o + 2 * i, &v, 2);
            }
        }
    }
}

static int fill_ternary(bn_gguf_sink_t *sink, const spec_t *s, char *err, size_t errlen)
{
    gen_t *g = s->g;
    uint64_t n = s->ne0 * s->ne1;
    job_t j = { .s = s, .key = tensor_key(g->c->seed, s->name), .trits = g->trits, .out = g->packed };
    j.scale = ternary_scale(j.key, s->ne0);
    parallel_rows(g->c->threads, trit_rows, &j, s->ne1);
    int rc;
    if (s->type == BN_TYPE_I2_S) {
        /* One call: the scale tail follows the whole tensor, not each row. */
        rc = bn_pack_i2_s(g->trits, n, j.scale, g->packed);
    } else {
        parallel_rows(g->c->threads, pack_rows, &j, s->ne1);
        rc = BN_OK;
    }
    if (rc != BN_OK)
        return bn_err(err, errlen, rc, "%s: cannot pack %s", s->name, bn_type_name(s->type));
    return bn_gguf_sink_write(sink, g->packed, s->nbytes, err, errlen);
}

static void embd_rows(void *p, uint64_t r0, uint64_t r1)
{
    job_t *j = p;
    const spec_t *s = j->s;
    uint64_t n = s->ne0, rb = s->nbytes / s->ne1;
    double sd = 1.0 / sqrt((double)n);
    for (uint64_t r = r0; r < r1; r++) {
        float *x = j->rows + r * n;
        uint8_t *o = j->out + r * rb;
        rng_t rng = rng_stream(j->key, 1 + j->row0 + r);
        gen_normal(&rng, x, n, 0.0, sd);
        switch (s->type) {
        case BN_TYPE_F32: memcpy(o, x, n * sizeof(float)); break;
        case BN_TYPE_F16: bn_pack_f16(x, n, (bn_fp16_t *)o); break;
        case BN_TYPE_Q8_0: bn_pack_q8_0(x, n, (bn_block_q8_0 *)o); break;
        case BN_TYPE_Q4_0: bn_pack_q4_0(x, n, (bn_block_q4_0 *)o); break;
        case BN_TYPE_Q6_K: bn_pack_q6_k(x, n, (bn_block_q6_k *)o); break;
        }
    }
}

static int fill_embd(bn_gguf_sink_t *sink, const spec_t *s, char *err, size_t errlen)
{
    gen_t *g = s->g;
    job_t j = { .s = s, .key = tensor_key(g->c->seed, s->name), .rows = g->rows, .out = g->qrows };
    uint64_t rb = s->nbytes / s->ne1;
    for (uint64_t r0 = 0; r0 < s->ne1; r0 += EMBD_CHUNK) {
        uint64_t nr = s->ne1 - r0 < EMBD_CHUNK ? s->ne1 - r0 : EMBD_CHUNK;
        j.row0 = r0;
        parallel_rows(g->c->threads, embd_rows, &j, nr);
        int rc = bn_gguf_sink_write(sink, g->qrows, nr * rb, err, errlen);
        if (rc != BN_OK)
            return rc;
    }
    return BN_OK;
}

static int fill_norm(bn_gguf_sink_t *sink, const spec_t *s, char *err, size_t errlen)
{
    float *x = malloc(s->ne0 * sizeof *x);
    if (!x)
        return bn_err(err, errlen, BN_ENOMEM, "%s: out of memory", s->name);
    rng_t rng = rng_stream(tensor_key(s->g->c->seed, s->name), 1);
    gen_normal(&rng, x, s->ne0, 1.0, 0.1);
    int rc = bn_gguf_sink_write(sink, x, s->ne0 * sizeof *x, err, errlen);
    free(x);
    return rc;
}

/* Allocates the scratch buffers on first use, so a failed flag check or a
 * header-only failure costs nothing. */
static int gen_scratch(gen_t *g, char *err, size_t errlen)
{
    if (g->trits)
        return BN_OK;
    uint64_t embd_row = bn_type_nbytes(g->c->embd_type, g->c->n_embd, 0);
    g->trits = malloc(g->max_n);
    g->packed = malloc(g->max_bytes);
    g->rows = malloc((size_t)EMBD_CHUNK * g->c->n_embd * sizeof(float));
    g->qrows = malloc((size_t)EMBD_CHUNK * embd_row);
    if (!g->trits || !g->packed || !g->rows || !g->qrows)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory for %llu MB of scratch buffers",
                      (unsigned long long)((g->max_n + g->max_bytes) >> 20));
    return BN_OK;
}

static int fill(bn_gguf_sink_t *sink, void *user, char *err, size_t errlen)
{
    const spec_t *s = user;
    int rc = gen_scratch(s->g, err, errlen);
    if (rc != BN_OK)
        return rc;
    switch (s->kind) {
    case KIND_EMBD: return fill_embd(sink, s, err, errlen);
    case KIND_NORM: return fill_norm(sink, s, err, errlen);
    case KIND_TERNARY: return fill_ternary(sink, s, err, errlen);
    }
    return bn_err(err, errlen, BN_EINTERNAL, "%s: unknown tensor kind", s->name);
}

/* The tensor list, in the order of the fixtures (and of Microsoft's converter). */
static spec_t *make_specs(const config_t *c, gen_t *g, size_t *count)
{
    size_t n = 2 + 11 * (size_t)c->n_layer;
    spec_t *sp = calloc(n, sizeof *sp);
    if (!sp)
        return NULL;
    uint64_t head_dim = c->n_embd / c->n_head, n_kv = (uint64_t)c->n_head_kv * head_dim;
    size_t k = 0;
#define ADD(kind_, type_, ne0_, ne1_, ...) do { \
        spec_t *s_ = &sp[k++]; \
        snprintf(s_->name, sizeof s_->name, __VA_ARGS__); \
        s_->kind = kind_; s_->type = type_; s_->ne0 = ne0_; s_->ne1 = ne1_; s_->g = g; \
    } while (0)
    ADD(KIND_EMBD, c->embd_type, c->n_embd, c->n_vocab, "token_embd.weight");
    ADD(KIND_NORM, BN_TYPE_F32, c->n_embd, 1, "output_norm.weight");
    /* A TQ ffn_down with rows of n_ff that are not whole blocks: F16 ternary values. */
    uint32_t down_type = c->n_ff % bn_type_block(c->wtype) == 0 ? c->wtype : BN_TYPE_F16;
    for (uint32_t l = 0; l < c->n_layer; l++) {
        ADD(KIND_NORM, BN_TYPE_F32, c->n_embd, 1, "blk.%u.attn_norm.weight", l);
        ADD(KIND_TERNARY, c->wtype, c->n_embd, c->n_embd, "blk.%u.attn_q.weight", l);
        ADD(KIND_TERNARY, c->wtype, c->n_embd, n_kv, "blk.%u.attn_k.weight", l);
        ADD(KIND_TERNARY, c->wtype, c->n_embd, n_kv, "blk.%u.attn_v.weight", l);
        ADD(KIND_NORM, BN_TYPE_F32, c->n_embd, 1, "blk.%u.attn_sub_norm.weight", l);
        ADD(KIND_TERNARY, c->wtype, c->n_embd, c->n_embd, "blk.%u.attn_output.weight", l);
        ADD(KIND_NORM, BN_TYPE_F32, c->n_embd, 1, "blk.%u.ffn_norm.weight", l);
        ADD(KIND_TERNARY, c->wtype, c->n_embd, c->n_ff, "blk.%u.ffn_gate.weight", l);
        ADD(KIND_TERNARY, c->wtype, c->n_embd, c->n_ff, "blk.%u.ffn_up.weight", l);
        ADD(KIND_NORM, BN_TYPE_F32, c->n_ff, 1, "blk.%u.ffn_sub_norm.weight", l);
        ADD(KIND_TERNARY, down_type, c->n_ff, c->n_embd, "blk.%u.ffn_down.weight", l);
    }
#undef ADD
    for (size_t i = 0; i < n; i++) {
        spec_t *s = &sp[i];
        s->nbytes = bn_type_nbytes(s->type, s->ne0 * s->ne1, 1);
        if (s->kind == KIND_TERNARY) {
            uint64_t ne = s->ne0 * s->ne1;
            g->max_n = ne > g->max_n ? ne : g->max_n;
            g->max_bytes = s->nbytes > g->max_bytes ? s->nbytes : g->max_bytes;
        }
    }
    *count = n;
    return sp;
}

/* ---------------------------------------------------------------- metadata */

static const char chat_template[] =
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {% elif m['role'] == 'user' %}User: {% else %}Assistant: {% endif %}"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}";

static int add_metadata(bn_gguf_writer_t *w, const config_t *c, const vocab_t *v, char *err, size_t errlen)
{
    char key[128], name[160];
    uint32_t file_type = 0;
    for (size_t k = 0; k < sizeof wtypes / sizeof wtypes[0]; k++)
        if (wtypes[k].type == c->wtype)
            file_type = wtypes[k].file_type;
    snprintf(name, sizeof name, "bitnet-mkmodel-%s-%s-%s-seed%llu", c->preset, c->arch, c->wtype_name,
             (unsigned long long)c->seed);
    int rc = BN_OK;
#define TRY(call) do { if (rc == BN_OK) rc = (call); } while (0)
#define ARCH_KEY(k) (snprintf(key, sizeof key, "%s.%s", c->arch, k), key)
    TRY(bn_gguf_writer_add_str(w, "general.architecture", c->arch, err, errlen));
    TRY(bn_gguf_writer_add_str(w, "general.name", name, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, ARCH_KEY("vocab_size"), c->n_vocab, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, ARCH_KEY("context_length"), c->n_ctx, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, ARCH_KEY("embedding_length"), c->n_embd, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, ARCH_KEY("block_count"), c->n_layer, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, ARCH_KEY("feed_forward_length"), c->n_ff, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, ARCH_KEY("rope.dimension_count"), c->n_embd / c->n_head, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, ARCH_KEY("attention.head_count"), c->n_head, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, ARCH_KEY("attention.head_count_kv"), c->n_head_kv, err, errlen));
    TRY(bn_gguf_writer_add_f32(w, ARCH_KEY("attention.layer_norm_rms_epsilon"), c->rms_eps, err, errlen));
    TRY(bn_gguf_writer_add_f32(w, ARCH_KEY("rope.freq_base"), c->rope_base, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, "general.file_type", file_type, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, "general.quantization_version", 2, err, errlen));
    TRY(bn_gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2", err, errlen));
    if (strcmp(c->arch, "bitnet") == 0) /* llama.cpp's arch: name the pre-tokenizer */
        TRY(bn_gguf_writer_add_str(w, "tokenizer.ggml.pre", "llama-bpe", err, errlen));
    TRY(bn_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v->text, v->n, err, errlen));
    float *scores = rc == BN_OK ? calloc(v->n, sizeof *scores) : NULL;
    if (rc == BN_OK && !scores)
        rc = bn_err(err, errlen, BN_ENOMEM, "out of memory for the token scores");
    TRY(bn_gguf_writer_add_arr(w, "tokenizer.ggml.scores", BN_GGUF_FLOAT32, scores, v->n, err, errlen));
    free(scores);
    TRY(bn_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", BN_GGUF_INT32, v->type, v->n, err, errlen));
    TRY(bn_gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merges, v->n_merges,
                                   err, errlen));
    TRY(bn_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", v->bos, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", v->eos, err, errlen));
    TRY(bn_gguf_writer_add_u32(w, "tokenizer.ggml.padding_token_id", v->eos, err, errlen));
    TRY(bn_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", 1, err, errlen));
    TRY(bn_gguf_writer_add_str(w, "tokenizer.chat_template", chat_template, err, errlen));
#undef ARCH_KEY
#undef TRY
    return rc;
}

/* ---------------------------------------------------------------- main */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    config_t c;
    int pr = parse_args(argc, argv, &c);
    if (pr < 0)
        return 0;
    if (pr == 0)
        return 2;

    double t0 = now_s();
    char err[512] = "";
    vocab_t v;
    gen_t g = { .c = &c };
    size_t n_specs = 0;
    spec_t *specs = NULL;
    bn_gguf_writer_t *w = NULL;
    int rc = build_vocab(&v, c.n_vocab, err, sizeof err);
    if (rc != BN_OK) {
        fprintf(stderr, PROG ": %s\n", err);
        return 1;
    }
    if (!(w = bn_gguf_writer_new()) || !(specs = make_specs(&c, &g, &n_specs)))
        rc = bn_err(err, sizeof err, BN_ENOMEM, "out of memory");
    if (rc == BN_OK)
        rc = add_metadata(w, &c, &v, err, sizeof err);
    uint64_t total = 0;
    for (size_t i = 0; rc == BN_OK && i < n_specs; i++) {
        const spec_t *s = &specs[i];
        uint64_t ne[2] = { s->ne0, s->ne1 };
        rc = bn_gguf_writer_add_tensor_fn(w, s->name, s->type, s->ne1 > 1 ? 2 : 1, ne, s->nbytes, fill,
                                          &specs[i], err, sizeof err);
        total += s->nbytes;
    }
    if (rc == BN_OK)
        rc = bn_gguf_writer_write(w, c.out, err, sizeof err);
    if (rc == BN_OK)
        fprintf(stderr, PROG ": wrote %s: %s %s, %u layers, hidden %u, vocab %u (%u merges), "
                "%zu tensors, %.1f MB, %.1f s\n", c.out, c.arch, c.wtype_name, c.n_layer, c.n_embd,
                c.n_vocab, v.n_merges, n_specs, total / 1e6, now_s() - t0);
    else
        fprintf(stderr, PROG ": %s\n", err);

    bn_gguf_writer_destroy(&w);
    free(specs);
    free(g.trits);
    free(g.packed);
    free(g.rows);
    free(g.qrows);
    vocab_free(&v);
    return rc == BN_OK ? 0 : 1;
}
