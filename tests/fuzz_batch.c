/* fuzz_batch.c - libFuzzer target over the JSONL batch lines (coordinator/batch.c).
 *
 * Each input is one input line for bn_batch_parse (on top of defaults with a stop
 * string, so copying and freeing the defaults' strings is exercised too), then
 * the same bytes as an output file for bn_batch_done_load (which must keep every
 * whole line and drop a cut-short last one), then as the text of an answer line
 * and an error message, which must come out as one line of valid JSON. A broken
 * promise aborts. Built by `make fuzz` (clang); run for 10 s by the test batch_fuzz. */
#include "coordinator/batch.h"

#include "base/status.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void need(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "fuzz_batch: broken promise: %s\n", what);
        abort();
    }
}

/* an output line: ends with one newline, and is one JSON object */
static void check_line(char *line)
{
    need(line != NULL, "a line was made");
    size_t n = strlen(line);
    need(n > 1 && line[n - 1] == '\n' && !memchr(line, '\n', n - 1), "one whole line");
    cJSON *o = cJSON_ParseWithLength(line, n - 1);
    need(o && cJSON_IsObject(o), "the line is a JSON object");
    cJSON_Delete(o);
    free(line);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bn_gen_params_t def;
    bn_gen_params_init(&def);
    def.stop[0] = strdup("END");
    def.stop_len[0] = 3;
    def.n_stop = 1;
    char *id = NULL, err[256] = "";
    bn_gen_params_t g;
    int rc = bn_batch_parse((const char *)data, size, &def, &id, &g, err, sizeof err);
    if (rc == BN_OK) {
        need(id != NULL, "an accepted line has an id");
        need(!!g.prompt != !!g.tokens, "exactly one of prompt and tokens");
        need(g.n_stop >= 0 && g.n_stop <= BN_MAX_STOPS, "stop count");
        for (int i = 0; i < g.n_stop; i++)
            need(g.stop_len[i] >= 1 && g.stop_len[i] <= BN_MAX_STOP_LEN && strlen(g.stop[i]) == g.stop_len[i],
                 "stop lengths");
        need(g.sp.temp >= 0 && g.sp.temp <= 100 && g.sp.top_p > 0 && g.sp.top_p <= 1 && g.sp.min_p >= 0 &&
             g.sp.min_p < 1 && g.sp.top_k >= 0 && g.max_tokens <= BN_MAX_TOKENS_LIMIT, "sampling ranges");
    } else {
        need(err[0] != 0, "a refusal says why");
    }
    /* answer and error lines with this id and these bytes as text */
    int32_t ids[3] = { 1, 2, 3 };
    bn_usage_t u = { .prompt_tokens = 3, .completion_tokens = 3, .seed = 18446744073709551615ull };
    check_line(bn_batch_answer(id ? id : "null", (const char *)data, size, ids, 3, BN_FINISH_STOP, &u));
    char *msg = malloc(size + 1);
    need(msg != NULL, "memory");
    memcpy(msg, data, size);
    msg[size] = 0; /* up to the first NUL, as a C string */
    check_line(bn_batch_error(id, 7, msg));
    free(msg);
    free(id);
    bn_gen_params_free(&g);
    bn_gen_params_free(&def);
    /* the bytes as an output file to resume from */
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz-batch-%d.out", (int)getpid());
    FILE *f = fopen(path, "wb");
    need(f != NULL, "temp file");
    fwrite(data, 1, size, f);
    fclose(f);
    bn_batch_done_t *d = NULL;
    rc = bn_batch_done_load(path, &d, err, sizeof err);
    need(rc == BN_OK && d != NULL, "any output file loads");
    f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long kept = ftell(f);
    fclose(f);
    const uint8_t *nl = size ? memrchr(data, '\n', size) : NULL;
    need(kept == (nl ? nl - data + 1 : 0), "the file keeps exactly its whole lines");
    bn_batch_done_destroy(&d);
    unlink(path);
    return 0;
}
