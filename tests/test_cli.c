/* test_cli.c - bitnet-worker as a user runs it: real processes, real files.
 * --tokenize against the golden tokenization, --dump-logits against the golden
 * logits, greedy text against the golden continuations (plain and --chat),
 * sampling determinism, stopping, and clear errors for bad input. */
#include "test.h"

#include "coordinator/vocab.h"
#include "golden.h"
#include "base/status.h"

#include <math.h>
#include <string.h>
#include <unistd.h>

#define FIX "tests/fixtures/"
#define I2S FIX "tiny-b158-i2_s.gguf"

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

/* Run bitnet-worker with args; returns exit status, output in *out / *err. */
static int worker(const char *args, char **out, char **err)
{
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "%s/bitnet-worker --log-level warn %s", bin_dir(), args);
    return bn_test_run(cmd, out, err);
}

static int hexval(int c)
{
    return c <= '9' ? c - '0' : (c | 32) - 'a' + 10;
}

/* Every `tok` line of tiny.tokenizer.txt: --prompt-file with those bytes, --tokenize. */
BN_TEST(cli_tokenize_golden)
{
    FILE *f = fopen(FIX "tiny.tokenizer.txt", "r");
    CHECK(f != NULL);
    static char line[1 << 16];
    int cases = 0;
    char path[64];
    snprintf(path, sizeof path, "/tmp/bn-tok-%d.txt", (int)getpid());
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "tok ", 4) != 0)
            continue;
        char *hex = strtok(line + 4, " \n"), *cnt = strtok(NULL, " \n");
        CHECK(hex && cnt);
        FILE *t = fopen(path, "wb");
        if (strcmp(hex, "-") != 0)
            for (size_t i = 0; hex[i] && hex[i + 1]; i += 2)
                fputc(hexval(hex[i]) * 16 + hexval(hex[i + 1]), t);
        fclose(t);
        char want[1 << 14] = "";
        size_t wl = 0;
        for (char *id; (id = strtok(NULL, " \n"));)
            wl += (size_t)snprintf(want + wl, sizeof want - wl, wl ? " %s" : "%s", id);
        char args[256], *out = NULL;
        snprintf(args, sizeof args, "--model " I2S " --prompt-file %s --tokenize", path);
        CHECK_EQ_INT(worker(args, &out, NULL), 0);
        out[strcspn(out, "\n")] = 0;
        if (strcmp(out, want) != 0)
            BN_FAIL("text %s: got '%s', golden '%s'", hex, out, want);
        free(out);
        cases++;
    }
    fclose(f);
    unlink(path);
    fprintf(stderr, "  %d strings tokenized exactly\n", cases);
    CHECK(cases >= 30);
}

BN_TEST(cli_dump_logits_golden)
{
    static const char *const models[] = { "tiny-b158-i2_s", "tiny-b158-tq2_0", "tiny-b158-tq1_0", "tiny-bitnet-tq2_0" };
    char path[64];
    snprintf(path, sizeof path, "/tmp/bn-logits-%d.f32", (int)getpid());
    for (int mi = 0; mi < 4; mi++) {
        char gpath[128];
        snprintf(gpath, sizeof gpath, FIX "%s.logits.txt", models[mi]);
        golden_seq_t seqs[3];
        CHECK_EQ_INT(golden_logits_read(gpath, 512, seqs, 3), 3);
        for (int k = 0; k < 3; k++) {
            char args[2048];
            size_t l = (size_t)snprintf(args, sizeof args, "--model " FIX "%s.gguf --dump-logits %s --tokens ",
                                        models[mi], path);
            for (int i = 0; i < seqs[k].n; i++)
                l += (size_t)snprintf(args + l, sizeof args - l, i ? ",%d" : "%d", seqs[k].ids[i]);
            CHECK_EQ_INT(worker(args, NULL, NULL), 0);
            size_t len;
            float *got = (float *)bn_test_read_file(path, &len);
            CHECK(got != NULL);
            CHECK_EQ_INT(len, (size_t)seqs[k].n * 512 * sizeof(float));
            double md;
            CHECK_EQ_INT(golden_compare(got, seqs[k].logits, seqs[k].n, 512, 0.2, &md), 0);
            CHECK(md <= 0.2);
            fprintf(stderr, "  %s seq %d: max |diff| %.3g\n", models[mi], k, md);
            free(got);
            golden_seq_free(&seqs[k]);
        }
    }
    unlink(path);
}

/* Greedy ids as printed by --print-ids against the golden output, with the README's
 * margin rule. */
static void check_ids(const char *out, const golden_gen_t *g)
{
    const char *p = out;
    int i = 0;
    for (; i < g->n_out; i++) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p)
            BN_FAIL("only %d ids in '%s'", i, out);
        if (v != g->out[i]) {
            fprintf(stderr, "  step %d: %ld vs golden %d, margin %.4f\n", i, v, g->out[i], g->margin[i]);
            CHECK(g->margin[i] < 0.2f);
            return;
        }
        p = end;
    }
}

BN_TEST(cli_generate_golden)
{
    golden_gen_t g[2];
    CHECK_EQ_INT(golden_generate_read(FIX "tiny-b158-i2_s.generate.txt", g, 2), 2);
    char *out = NULL;
    /* prompt 0 is bos + "The quick brown fox": the BOS is added by the worker */
    CHECK_EQ_INT(worker("--model " I2S " --prompt 'The quick brown fox' -n 32 --temp 0 --print-ids", &out, NULL), 0);
    check_ids(out, &g[0]); /* the default (q6) head: divergence only where the margin is small */
    free(out);
    CHECK_EQ_INT(worker("--model " I2S " --prompt 'The quick brown fox' -n 32 --temp 0 --lm-head f16 --print-ids", &out, NULL), 0);
    check_ids(out, &g[0]);
    free(out);
    /* prompt 1 is the chat form of "What is 2+2?" */
    CHECK_EQ_INT(worker("--model " I2S " --chat --prompt 'What is 2+2?' --tokenize", &out, NULL), 0);
    char want[512] = "";
    size_t wl = 0;
    for (int i = 0; i < g[1].n_prompt; i++)
        wl += (size_t)snprintf(want + wl, sizeof want - wl, i ? " %d" : "%d", g[1].prompt[i]);
    out[strcspn(out, "\n")] = 0;
    CHECK_STR_EQ(out, want);
    free(out);
    CHECK_EQ_INT(worker("--model " I2S " --chat --prompt 'What is 2+2?' -n 32 --temp 0 --print-ids", &out, NULL), 0);
    check_ids(out, &g[1]);
    free(out);
    /* with the exact f16 head and f32 KV cache the greedy text is the golden one, byte for byte:
     * text mode prints exactly the bytes of the tokens' pieces (here, the first is
     * the byte token 0x00), then a newline */
    char path[64], args[256];
    snprintf(path, sizeof path, "/tmp/bn-gen-%d.txt", (int)getpid());
    snprintf(args, sizeof args, "--model " I2S " --prompt 'The quick brown fox' -n 32 --temp 0 --lm-head f16 --kv-type f32 > %s", path);
    CHECK_EQ_INT(worker(args, NULL, NULL), 0);
    size_t len;
    char *text = bn_test_read_file(path, &len);
    char em[64];
    bn_gguf_t *gg = NULL;
    bn_tokenizer_t *tok = NULL;
    CHECK(bn_gguf_open(I2S, &gg, em, sizeof em) == BN_OK);
    CHECK(bn_vocab_load(gg, &tok, em, sizeof em) == BN_OK);
    char bytes[4096];
    size_t bl = 0;
    for (int i = 0; i < g[0].n_out; i++)
        bl += bn_tokenizer_piece(tok, g[0].out[i], bytes + bl, sizeof bytes - bl);
    bytes[bl++] = '\n';
    CHECK_EQ_INT(len, bl);
    CHECK(memcmp(text, bytes, bl) == 0);
    bn_tokenizer_destroy(&tok);
    bn_gguf_close(&gg);
    free(text);
    unlink(path);
}

BN_TEST(cli_sampling)
{
    char *a = NULL, *b = NULL, *c = NULL;
    const char *base = "--model " I2S " --prompt 'Hello world' -n 24 --temp 1.0 --top-k 100 --top-p 0.9 --min-p 0.01 --print-ids";
    char args[512];
    snprintf(args, sizeof args, "%s --seed 11", base);
    CHECK_EQ_INT(worker(args, &a, NULL), 0);
    CHECK_EQ_INT(worker(args, &b, NULL), 0);
    CHECK_STR_EQ(a, b); /* same seed, same tokens */
    snprintf(args, sizeof args, "%s --seed 12", base);
    CHECK_EQ_INT(worker(args, &c, NULL), 0);
    CHECK(strcmp(a, c) != 0); /* 24 tokens of a near-uniform tiny model: a clash is ~impossible */
    free(a); free(b); free(c);
    /* top-k 1 is greedy whatever the temperature and seed */
    CHECK_EQ_INT(worker("--model " I2S " --prompt 'Hello world' -n 16 --temp 0 --print-ids", &a, NULL), 0);
    CHECK_EQ_INT(worker("--model " I2S " --prompt 'Hello world' -n 16 --temp 5 --top-k 1 --seed 3 --print-ids", &b, NULL), 0);
    CHECK_STR_EQ(a, b);
    free(a); free(b);
}

/* -n stops, EOS stops (a copy of the model whose eos id is a token that greedy
 * decoding produces), and the stop set names eos and <|eot_id|>. */
BN_TEST(cli_stops)
{
    char *out = NULL, *err = NULL;
    CHECK_EQ_INT(worker("--model " I2S " --prompt 'The quick brown fox' -n 5 --temp 0 --print-ids", &out, NULL), 0);
    int n = 0;
    for (char *p = strtok(out, " \n"); p; p = strtok(NULL, " \n"))
        n++;
    CHECK_EQ_INT(n, 5);
    free(out);
    /* golden greedy output of this prompt: 188 62 188 178 84 ...; make 178 the eos */
    size_t len;
    char *buf = bn_test_read_file(I2S, &len);
    char *k = memmem(buf, len, "tokenizer.ggml.eos_token_id", 27);
    CHECK(k != NULL);
    uint32_t type, val = 178;
    memcpy(&type, k + 27, 4);
    CHECK_EQ_INT(type, 4); /* u32 */
    memcpy(k + 31, &val, 4);
    char path[64], args[256];
    snprintf(path, sizeof path, "/tmp/bn-eos-%d.gguf", (int)getpid());
    FILE *f = fopen(path, "wb");
    fwrite(buf, 1, len, f);
    fclose(f);
    free(buf);
    snprintf(args, sizeof args, "--model %s --prompt 'The quick brown fox' -n 32 --temp 0 --print-ids --log-level info", path);
    CHECK_EQ_INT(worker(args, &out, &err), 0);
    out[strcspn(out, "\n")] = 0;
    CHECK_STR_EQ(out, "188 62 188");
    CHECK(strstr(err, "request 1: eos,") != NULL); /* the scheduler's line per request */
    CHECK(strstr(err, "stop tokens: eos 178, eot 505") != NULL);
    free(out);
    free(err);
    unlink(path);
}

BN_TEST(cli_stats_line)
{
    char *err = NULL;
    CHECK_EQ_INT(worker("--model " I2S " --prompt 'Hi' -n 8 --temp 0 --stats", NULL, &err), 0);
    char *s = strstr(err, "stats: prompt_tokens=");
    CHECK(s != NULL);
    int pt, gt;
    double ptps, gtps, rss;
    CHECK_EQ_INT(sscanf(s, "stats: prompt_tokens=%d prompt_tps=%lf gen_tokens=%d gen_tps=%lf peak_rss_mb=%lf",
                        &pt, &ptps, &gt, &gtps, &rss), 5);
    char *ids = NULL;
    CHECK_EQ_INT(worker("--model " I2S " --prompt 'Hi' --tokenize", &ids, NULL), 0);
    int n_ids = 0;
    for (char *p = strtok(ids, " \n"); p; p = strtok(NULL, " \n"))
        n_ids++;
    free(ids);
    CHECK_EQ_INT(pt, n_ids + 1); /* bos + "Hi" */
    CHECK_EQ_INT(gt, 8);
    CHECK(ptps > 0 && gtps > 0 && rss > 0);
    free(err);
}

/* Bad input: exit status non-zero, one clear line naming what was wrong. */
BN_TEST(cli_bad_input)
{
    static const struct { const char *args; int code; const char *msg; } cases[] = {
        { "--model " I2S " --prompt hi --temp -1", 2, "--temp" },
        { "--model " I2S " --prompt hi --temp abc", 2, "--temp" },
        { "--model " I2S " --prompt hi --top-p 0", 2, "--top-p" },
        { "--model " I2S " --prompt hi --top-p 1.5", 2, "--top-p" },
        { "--model " I2S " --prompt hi --min-p 1", 2, "--min-p" },
        { "--model " I2S " --prompt hi --top-k -3", 2, "--top-k" },
        { "--model " I2S " --prompt hi -n x", 2, "-n" },
        { "--model " I2S " --prompt hi --seed -5", 2, "--seed" },
        { "--model " I2S " --prompt hi --ctx 0", 2, "--ctx" },
        { "--model " I2S " --prompt hi --kv-type q5", 2, "--kv-type" },
        { "--model " I2S " --prompt hi --window 0", 2, "--window" },
        { "--model " I2S " --prompt hi --prefix-cache-mb -1", 2, "--prefix-cache-mb" },
        { "--model " I2S " --prompt hi --lm-head q5", 2, "--lm-head" },
        { "--model " I2S " --prompt hi --frobnicate 1", 2, "--frobnicate" },
        { "--model " I2S " --prompt", 2, "--prompt" },
        { "--prompt hi", 2, "--model" },
        { "--model " I2S, 2, "--prompt" },
        { "--model " I2S " --tokens 1,2,99999", 2, "unknown token id 99999" },
        { "--model " I2S " --tokens 1,,2", 2, "--tokens" },
        { "--model " I2S " --tokens -1", 2, "unknown token id -1" },
        { "--model " I2S " --prompt 'a b c d e f g h i j k l m n o p' --ctx 4", 1, "context" },
        { "--model /nonexistent.gguf --prompt hi", 1, "/nonexistent.gguf" },
        { "--model " FIX "bad-magic.gguf --prompt hi", 1, "bad magic" },
        { "--model " FIX "bad-truncated-header.gguf --prompt hi", 1, "truncated header" },
        { "--model " FIX "bad-truncated-data.gguf --prompt hi", 1, "blk.1.ffn_up.weight" },
        { "--model " FIX "bad-unknown-type.gguf --prompt hi", 1, "blk.0.attn_q.weight" },
        { "--model " FIX "bad-offset-out-of-range.gguf --prompt hi", 1, "blk.3.ffn_down.weight" },
        { "--model " FIX "bad-missing-key.gguf --prompt hi", 1, "embedding_length" },
        { "--model " I2S " --prompt-file /nonexistent.txt", 1, "/nonexistent.txt" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *out = NULL, *err = NULL;
        int rc = worker(cases[i].args, &out, &err);
        fprintf(stderr, "  [%d] %s -> %s", rc, cases[i].args, err);
        CHECK_EQ_INT(rc, cases[i].code);
        CHECK(strstr(err, cases[i].msg) != NULL);
        CHECK(out[0] == 0); /* nothing on stdout */
        free(out);
        free(err);
    }
}
