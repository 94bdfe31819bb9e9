/* batch.c - JSONL lines of batch jobs, and what an output file already holds; see batch.h. */
#include "coordinator/batch.h"

#include "base/status.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int num(const cJSON *o, const char *key, double lo, double hi, int integer, double *v, int *present,
               char *err, size_t errlen)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    *present = it != NULL && !cJSON_IsNull(it);
    if (!*present)
        return BN_OK;
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble) || it->valuedouble < lo || it->valuedouble > hi ||
        (integer && it->valuedouble != floor(it->valuedouble)))
        return bn_err(err, errlen, BN_EINVAL, "\"%s\" must be %s in [%g, %g]", key, integer ? "an integer" : "a number",
                      lo, hi);
    *v = it->valuedouble;
    return BN_OK;
}

static int add_stop(bn_gen_params_t *p, const cJSON *s, char *err, size_t errlen)
{
    if (!cJSON_IsString(s))
        return bn_err(err, errlen, BN_EINVAL, "\"stop\" must be a string or a list of strings");
    size_t l = strlen(s->valuestring);
    if (p->n_stop >= BN_MAX_STOPS || l == 0 || l > BN_MAX_STOP_LEN)
        return bn_err(err, errlen, BN_EINVAL, "\"stop\": at most %d strings of 1..%d bytes", BN_MAX_STOPS,
                      BN_MAX_STOP_LEN);
    if (!(p->stop[p->n_stop] = strdup(s->valuestring)))
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    p->stop_len[p->n_stop++] = l;
    return BN_OK;
}

static int parse_obj(const cJSON *o, bn_gen_params_t *p, char *err, size_t errlen)
{
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(o, "prompt");
    const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(o, "tokens");
    if (!!prompt == !!tokens)
        return bn_err(err, errlen, BN_EINVAL, "give either \"prompt\" or \"tokens\"");
    if (prompt) {
        if (!cJSON_IsString(prompt))
            return bn_err(err, errlen, BN_EINVAL, "\"prompt\" must be a string");
        if (!(p->prompt = strdup(prompt->valuestring)))
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        p->prompt_len = strlen(p->prompt);
    } else {
        int n = cJSON_IsArray(tokens) ? cJSON_GetArraySize(tokens) : -1;
        if (n <= 0)
            return bn_err(err, errlen, BN_EINVAL, "\"tokens\" must be a non-empty list of token ids");
        if (!(p->tokens = malloc((size_t)n * sizeof *p->tokens)))
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        const cJSON *t;
        size_t i = 0;
        cJSON_ArrayForEach(t, tokens) {
            if (!cJSON_IsNumber(t) || t->valuedouble < 0 || t->valuedouble > 2147483647.0 ||
                t->valuedouble != floor(t->valuedouble))
                return bn_err(err, errlen, BN_EINVAL, "\"tokens\"[%zu] is not a token id", i);
            p->tokens[i++] = (int32_t)t->valuedouble;
        }
        p->n_tokens = i;
    }
    double v;
    int has, rc;
    if ((rc = num(o, "max_tokens", 0, BN_MAX_TOKENS_LIMIT, 1, &v, &has, err, errlen)))
        return rc;
    if (has)
        p->max_tokens = (uint32_t)v;
    if ((rc = num(o, "temperature", 0, 100, 0, &v, &has, err, errlen)))
        return rc;
    if (has)
        p->sp.temp = (float)v;
    if ((rc = num(o, "top_k", 0, 2147483647.0, 1, &v, &has, err, errlen)))
        return rc;
    if (has)
        p->sp.top_k = (int32_t)v;
    if ((rc = num(o, "top_p", 0, 1, 0, &v, &has, err, errlen)))
        return rc;
    if (has) {
        if (v == 0)
            return bn_err(err, errlen, BN_EINVAL, "\"top_p\" must be above 0");
        p->sp.top_p = (float)v;
    }
    if ((rc = num(o, "min_p", 0, 1, 0, &v, &has, err, errlen)))
        return rc;
    if (has) {
        if (v >= 1)
            return bn_err(err, errlen, BN_EINVAL, "\"min_p\" must be below 1");
        p->sp.min_p = (float)v;
    }
    if ((rc = num(o, "seed", 0, 9007199254740991.0, 1, &v, &has, err, errlen)))
        return rc;
    if (has) {
        p->sp.seed = (uint64_t)v;
        p->seed_given = 1;
    }
    const cJSON *chat = cJSON_GetObjectItemCaseSensitive(o, "chat");
    if (chat && !cJSON_IsNull(chat)) {
        if (!cJSON_IsBool(chat))
            return bn_err(err, errlen, BN_EINVAL, "\"chat\" must be true or false");
        p->chat = cJSON_IsTrue(chat);
    }
    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(o, "stop");
    if (stop && !cJSON_IsNull(stop)) { /* the line's stop strings replace the defaults' */
        for (int i = 0; i < p->n_stop; i++)
            free(p->stop[i]);
        p->n_stop = 0;
        if (cJSON_IsArray(stop)) {
            const cJSON *s;
            cJSON_ArrayForEach(s, stop) if ((rc = add_stop(p, s, err, errlen))) return rc;
        } else if ((rc = add_stop(p, stop, err, errlen))) {
            return rc;
        }
    }
    return BN_OK;
}

int bn_batch_parse(const char *line, size_t len, const bn_gen_params_t *defaults, char **id_json,
                   bn_gen_params_t *out, char *err, size_t errlen)
{
    *id_json = NULL;
    *out = *defaults;
    out->prompt = NULL;
    out->tokens = NULL;
    out->n_tokens = 0;
    out->n_stop = 0; /* the defaults' stop strings are copied below, so each request owns its own */
    for (int i = 0; i < defaults->n_stop; i++)
        if (!(out->stop[i] = strdup(defaults->stop[i])))
            return bn_err(err, errlen, BN_ENOMEM, "out of memory");
        else
            out->stop_len[i] = defaults->stop_len[i], out->n_stop = i + 1;
    cJSON *o = cJSON_ParseWithLength(line, len);
    if (!o)
        return bn_err(err, errlen, BN_EINVAL, "not JSON");
    int rc = BN_OK;
    if (!cJSON_IsObject(o)) {
        rc = bn_err(err, errlen, BN_EINVAL, "not a JSON object");
        goto done;
    }
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    if (!id || !(cJSON_IsString(id) || cJSON_IsNumber(id))) {
        rc = bn_err(err, errlen, BN_EINVAL, "no \"id\" (a string or a number)");
        goto done;
    }
    if (!(*id_json = cJSON_PrintUnformatted(id))) {
        rc = bn_err(err, errlen, BN_ENOMEM, "out of memory");
        goto done;
    }
    rc = parse_obj(o, out, err, errlen);
done:
    cJSON_Delete(o);
    return rc;
}

/* bytes of the UTF-8 character at s (1..4), or 0 when it is not valid there */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    if (s[0] < 0x80)
        return 1;
    size_t k = s[0] >= 0xF0 && s[0] <= 0xF4 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 && s[0] < 0xE0 ? 2 : 0;
    if (!k || k > n)
        return 0;
    for (size_t i = 1; i < k; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    if ((k == 3 && s[0] == 0xE0 && s[1] < 0xA0) || (k == 3 && s[0] == 0xED && s[1] >= 0xA0) ||
        (k == 4 && s[0] == 0xF0 && s[1] < 0x90) || (k == 4 && s[0] == 0xF4 && s[1] >= 0x90))
        return 0;
    return k;
}

char *bn_batch_answer(const char *id_json, const char *text, size_t len, const int32_t *ids, size_t n_ids,
                      int finish, const bn_usage_t *u)
{
    char *clean = malloc(len * 3 + 1), *line = NULL;
    cJSON *o = cJSON_CreateObject();
    if (!clean || !o)
        goto done;
    size_t k = 0;
    for (size_t i = 0; i < len;) {
        size_t c = utf8_len((const unsigned char *)text + i, len - i);
        if (c && text[i]) {
            memcpy(clean + k, text + i, c);
            k += c;
            i += c;
        } else { /* a bad byte (or NUL): U+FFFD */
            memcpy(clean + k, "\xEF\xBF\xBD", 3);
            k += 3;
            i++;
        }
    }
    clean[k] = 0;
    cJSON *id = cJSON_Parse(id_json), *toks = cJSON_CreateArray(), *us = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "id", id ? id : cJSON_CreateNull());
    cJSON_AddStringToObject(o, "text", clean);
    for (size_t i = 0; toks && i < n_ids; i++)
        cJSON_AddItemToArray(toks, cJSON_CreateNumber(ids[i]));
    cJSON_AddItemToObject(o, "tokens", toks);
    cJSON_AddStringToObject(o, "finish_reason", bn_finish_name(finish));
    cJSON_AddNumberToObject(us, "prompt_tokens", u->prompt_tokens);
    cJSON_AddNumberToObject(us, "completion_tokens", u->completion_tokens);
    cJSON_AddNumberToObject(us, "time_to_first_token_ms", round(u->ttft_ms * 1000) / 1000);
    cJSON_AddNumberToObject(us, "tokens_per_s", round(u->tokens_per_s * 1000) / 1000);
    cJSON_AddNumberToObject(us, "total_ms", round(u->total_ms * 1000) / 1000);
    char seed[24]; /* a string: a JSON number (a double) would round a 64-bit seed */
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)u->seed);
    cJSON_AddStringToObject(us, "seed", seed);
    cJSON_AddItemToObject(o, "usage", us);
    char *s = cJSON_PrintUnformatted(o);
    if (s && (line = malloc(strlen(s) + 2)))
        sprintf(line, "%s\n", s);
    cJSON_free(s);
done:
    cJSON_Delete(o);
    free(clean);
    return line;
}

char *bn_batch_error(const char *id_json, int line_no, const char *msg)
{
    cJSON *o = cJSON_CreateObject(), *id = id_json ? cJSON_Parse(id_json) : NULL;
    cJSON_AddItemToObject(o, "id", id ? id : cJSON_CreateNull());
    cJSON_AddNumberToObject(o, "line", line_no);
    cJSON_AddStringToObject(o, "error", msg);
    char *s = cJSON_PrintUnformatted(o), *line = NULL;
    if (s && (line = malloc(strlen(s) + 2)))
        sprintf(line, "%s\n", s);
    cJSON_free(s);
    cJSON_Delete(o);
    return line;
}

/* ---- what OUT holds: a set of id strings and of id-less error lines ---- */

struct bn_batch_done {
    char **ids;          /* open addressing, cap a power of two */
    size_t cap, n;
    int *lines;
    size_t n_lines, lines_cap;
};

static uint64_t hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

int bn_batch_done_has_id(const bn_batch_done_t *d, const char *id)
{
    if (!d->cap)
        return 0;
    for (size_t i = hash(id) & (d->cap - 1);; i = (i + 1) & (d->cap - 1)) {
        if (!d->ids[i])
            return 0;
        if (!strcmp(d->ids[i], id))
            return 1;
    }
}

int bn_batch_done_add(bn_batch_done_t *d, const char *id)
{
    if (bn_batch_done_has_id(d, id))
        return BN_OK;
    if (2 * (d->n + 1) > d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 64;
        char **nids = calloc(cap, sizeof *nids);
        if (!nids)
            return BN_ENOMEM;
        for (size_t i = 0; i < d->cap; i++)
            if (d->ids[i]) {
                size_t j = hash(d->ids[i]) & (cap - 1);
                while (nids[j])
                    j = (j + 1) & (cap - 1);
                nids[j] = d->ids[i];
            }
        free(d->ids);
        d->ids = nids;
        d->cap = cap;
    }
    size_t j = hash(id) & (d->cap - 1);
    while (d->ids[j])
        j = (j + 1) & (d->cap - 1);
    if (!(d->ids[j] = strdup(id)))
        return BN_ENOMEM;
    d->n++;
    return BN_OK;
}

int bn_batch_done_has_line(const bn_batch_done_t *d, int line_no)
{
    for (size_t i = 0; i < d->n_lines; i++)
        if (d->lines[i] == line_no)
            return 1;
    return 0;
}

size_t bn_batch_done_count(const bn_batch_done_t *d)
{
    return d->n + d->n_lines;
}

void bn_batch_done_destroy(bn_batch_done_t **pd)
{
    if (!pd || !*pd)
        return;
    bn_batch_done_t *d = *pd;
    for (size_t i = 0; i < d->cap; i++)
        free(d->ids[i]);
    free(d->ids);
    free(d->lines);
    free(d);
    *pd = NULL;
}

/* one line of OUT: its id, or for an id-less error its input line */
static int take(bn_batch_done_t *d, const char *line, size_t len)
{
    cJSON *o = cJSON_ParseWithLength(line, len);
    if (!o)
        return BN_OK; /* not ours: nothing to skip for it */
    int rc = BN_OK;
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id"), *ln = cJSON_GetObjectItemCaseSensitive(o, "line");
    if (id && (cJSON_IsString(id) || cJSON_IsNumber(id))) {
        char *s = cJSON_PrintUnformatted(id);
        rc = s ? bn_batch_done_add(d, s) : BN_ENOMEM;
        cJSON_free(s);
    } else if (cJSON_IsNumber(ln)) {
        if (d->n_lines == d->lines_cap) {
            size_t cap = d->lines_cap ? d->lines_cap * 2 : 16;
            int *nl = realloc(d->lines, cap * sizeof *nl);
            if (!nl) {
                cJSON_Delete(o);
                return BN_ENOMEM;
            }
            d->lines = nl;
            d->lines_cap = cap;
        }
        d->lines[d->n_lines++] = (int)ln->valuedouble;
    }
    cJSON_Delete(o);
    return rc;
}

int bn_batch_done_new(bn_batch_done_t **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? BN_OK : BN_ENOMEM;
}

int bn_batch_done_load(const char *path, bn_batch_done_t **out, char *err, size_t errlen)
{
    bn_batch_done_t *d = calloc(1, sizeof *d);
    *out = NULL;
    if (!d)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errno == ENOENT) {
            *out = d;
            return BN_OK;
        }
        free(d);
        return bn_err(err, errlen, BN_EIO, "%s: cannot open: %s", path, strerror(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    long good = 0; /* bytes up to the last whole line */
    int rc = BN_OK;
    while (rc == BN_OK && (n = getline(&line, &cap, f)) > 0) {
        if (line[n - 1] != '\n')
            break; /* cut short by a kill: dropped */
        good += n;
        rc = take(d, line, (size_t)n - 1);
    }
    free(line);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    if (rc == BN_OK && size > good && truncate(path, good) != 0)
        rc = bn_err(err, errlen, BN_EIO, "%s: cannot drop its cut-short last line: %s", path, strerror(errno));
    if (rc) {
        bn_batch_done_destroy(&d);
        return rc == BN_ENOMEM ? bn_err(err, errlen, rc, "out of memory") : rc;
    }
    *out = d;
    return BN_OK;
}
