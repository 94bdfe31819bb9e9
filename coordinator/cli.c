/* cli.c - one prompt from the command line through the scheduler; see cli.h. */
#include "coordinator/cli.h"

#include "coordinator/sched.h"
#include "coordinator/vocab.h"
#include "base/status.h"
#include "base/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Parse "1,2,3" into ids; every id must be a token of the vocabulary. */
static int parse_tokens(const char *s, uint32_t n_vocab, int32_t **ids, size_t *n, char *err, size_t errlen)
{
    size_t cap = 16, k = 0;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory");
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || errno || (*end && *end != ',')) {
            free(v);
            return bn_err(err, errlen, BN_EINVAL, "--tokens: '%s' is not a comma-separated list of ids", s);
        }
        if (x < 0 || x >= (long)n_vocab) {
            free(v);
            return bn_err(err, errlen, BN_EINVAL, "--tokens: unknown token id %ld (vocabulary has %u tokens)", x, n_vocab);
        }
        if (k == cap) {
            int32_t *nv = realloc(v, (cap *= 2) * sizeof *v);
            if (!nv) {
                free(v);
                return bn_err(err, errlen, BN_ENOMEM, "out of memory");
            }
            v = nv;
        }
        v[k++] = (int32_t)x;
        p = *end ? end + 1 : end;
    }
    if (k == 0) {
        free(v);
        return bn_err(err, errlen, BN_EINVAL, "--tokens: no ids given");
    }
    *ids = v;
    *n = k;
    return BN_OK;
}

static char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        bn_err(err, errlen, BN_EIO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0, r;
    char *buf = malloc(cap);
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb)
                free(buf);
            buf = nb;
        }
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        free(buf);
        bn_err(err, errlen, BN_EIO, "%s: cannot read", path);
        return NULL;
    }
    *len = n;
    return buf;
}

/* the command line's sink: text (or ids) to stdout as it comes */
typedef struct {
    int print_ids, printed, finish;
    bn_usage_t u;
    char detail[256];
} out_t;

static void on_text(void *ctx, void *user, const char *text, size_t len, const int32_t *ids, int n_ids)
{
    out_t *o = ctx;
    if (o->print_ids)
        for (int i = 0; i < n_ids; i++)
            printf(o->printed++ ? " %d" : "%d", ids[i]);
    else
        fwrite(text, 1, len, stdout);
    fflush(stdout);
}

static void on_final(void *ctx, void *user, int finish, const bn_usage_t *u, const char *detail)
{
    out_t *o = ctx;
    o->finish = finish;
    o->u = *u;
    snprintf(o->detail, sizeof o->detail, "%s", detail ? detail : "");
}

int bn_cli_run(const bn_cli_opts_t *o, bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m,
               const bn_tokenizer_t *tok, uint32_t n_ctx, bn_cli_result_t *res, char *err, size_t errlen)
{
    const bn_config_t *c = &m->cfg;
    int32_t *ids = NULL;
    size_t n_ids = 0, text_len = 0;
    char *text = NULL;
    float *logits = NULL;
    bn_sched_t *s = NULL;
    bn_gen_params_t g = o->gen;
    int rc = BN_OK;
    memset(res, 0, sizeof *res);
    if (o->replica < 0 || o->replica >= plan->R) {
        rc = bn_err(err, errlen, BN_EINVAL, "--replica %d: the plan has %d replica%s (0..%d)", o->replica, plan->R,
                    plan->R == 1 ? "" : "s", plan->R - 1);
        goto done;
    }
    if (o->tokens) {
        if ((rc = parse_tokens(o->tokens, c->n_vocab, &ids, &n_ids, err, errlen)))
            goto done;
    } else {
        text = o->prompt ? strdup(o->prompt) : read_file(o->prompt_file, &text_len, err, errlen);
        if (!text) {
            rc = o->prompt ? bn_err(err, errlen, BN_ENOMEM, "out of memory") : BN_EIO;
            goto done;
        }
        if (o->prompt)
            text_len = strlen(text);
        if (o->tokenize) { /* the ids of the text as written (in its chat form with --chat), no BOS added */
            char *chat = NULL;
            size_t len = text_len;
            if (g.chat && (rc = bn_vocab_chat_wrap(m->gguf, text, text_len, &chat, &len, err, errlen)))
                goto done;
            rc = bn_tokenizer_encode(tok, chat ? chat : text, len, 1, &ids, &n_ids, err, errlen);
            free(chat);
            if (rc)
                goto done;
            for (size_t i = 0; i < n_ids; i++)
                printf(i ? " %d" : "%d", ids[i]);
            putchar('\n');
            goto done;
        }
        if ((rc = bn_prompt_encode(m, tok, text, text_len, g.chat, &ids, &n_ids, err, errlen)))
            goto done;
    }
    if (n_ids == 0) {
        rc = bn_err(err, errlen, BN_EINVAL, "the prompt is empty");
        goto done;
    }
    if (n_ids > n_ctx) {
        rc = bn_err(err, errlen, BN_ECONTEXT, "the prompt has %zu tokens, more than the context of %u (see --ctx)", n_ids,
                    n_ctx);
        goto done;
    }
    if (o->dump_logits && !(logits = malloc(n_ids * c->n_vocab * sizeof(float)))) {
        rc = bn_err(err, errlen, BN_ENOMEM, "out of memory for %zu rows of logits", n_ids);
        goto done;
    }
    out_t out = { .print_ids = o->print_ids };
    bn_sched_sink_t sink = { .ctx = &out, .on_text = on_text, .on_final = on_final };
    bn_sched_opts_t so = { .max_seqs = 1, .max_queue = 1, .step_tokens = BN_STEP_MAX, .n_ctx = n_ctx,
                           .kv_pos_bytes = 0 };
    if ((rc = bn_sched_new(eng, plan, m, tok, &so, &sink, &s, err, errlen)))
        goto done;
    /* the ids as prepared above, exactly */
    g.prompt = NULL;
    g.chat = 0;
    g.tokens = ids;
    g.n_tokens = n_ids;
    g.n_stop = 0;
    g.replica = o->replica;
    g.dump_logits = logits;
    ids = NULL;
    uint64_t id;
    if ((rc = bn_sched_submit(s, &g, NULL, &id, err, errlen)))
        goto done;
    /* until the request is done and no step is in flight (the engine stops
     * only an idle replica: a step still out would leave the others waiting) */
    while (rc == BN_OK && (bn_sched_pending(s) || bn_sched_inflight(s)))
        rc = bn_sched_pump(s, 1e9, err, errlen);
    if (rc)
        goto done;
    res->n_prompt = (int)out.u.prompt_tokens;
    res->n_gen = (int)out.u.completion_tokens;
    res->t_prompt = out.u.ttft_ms / 1e3;
    res->t_gen = out.u.gen_s;
    if (o->dump_logits) {
        res->t_prompt = out.u.total_ms / 1e3;
        FILE *f = fopen(o->dump_logits, "wb");
        size_t nv = (size_t)res->n_prompt * c->n_vocab;
        if (!f) {
            rc = bn_err(err, errlen, BN_EIO, "%s: cannot create: %s", o->dump_logits, strerror(errno));
        } else {
            size_t w = fwrite(logits, sizeof(float), nv, f);
            if (fclose(f) != 0 || w != nv)
                rc = bn_err(err, errlen, BN_EIO, "%s: write failed", o->dump_logits);
        }
    } else if (out.finish == BN_FINISH_ERROR || out.finish == BN_FINISH_CANCELLED) {
        rc = bn_err(err, errlen, BN_EINTERNAL, "generation ended: %s (%s)", bn_finish_name(out.finish), out.detail);
    } else {
        putchar('\n');
        fflush(stdout);
    }
done:
    bn_sched_destroy(&s);
    free(ids);
    free(text);
    free(logits);
    return rc;
}
