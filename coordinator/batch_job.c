/* batch_job.c - a JSONL job through rank 0's scheduler (bitnet-worker --batch); see batch.h. */
#include "coordinator/batch.h"
#include "coordinator/sched.h"

#include "base/status.h"
#include "worker/log.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* one request of the job in flight */
typedef struct {
    char *id_json;
    int line_no;
    char *text;
    size_t len, cap;
    int32_t *ids;
    size_t n_ids, ids_cap;
} job_req_t;

typedef struct {
    int fd;
    const char *path;
    int failed;             /* a write failed: stop reading */
    char err[256];
    bn_batch_summary_t *sum;
} job_t;

/* one whole line, one write */
static void put(job_t *j, char *line)
{
    if (!line) {
        j->failed = BN_ENOMEM;
        snprintf(j->err, sizeof j->err, "out of memory");
        return;
    }
    size_t n = strlen(line);
    ssize_t w = write(j->fd, line, n);
    if (w != (ssize_t)n && !j->failed) {
        j->failed = BN_EIO;
        snprintf(j->err, sizeof j->err, "%s: write failed: %s", j->path, w < 0 ? strerror(errno) : "short write");
    }
    free(line);
}

static void on_text(void *ctx, void *user, const char *text, size_t len, const int32_t *ids, int n_ids)
{
    job_req_t *r = user;
    if (r->len + len + 1 > r->cap) {
        size_t cap = (r->len + len + 1) * 2;
        char *nt = realloc(r->text, cap);
        if (!nt)
            return;
        r->text = nt;
        r->cap = cap;
    }
    if (len)
        memcpy(r->text + r->len, text, len);
    r->len += len;
    if (r->n_ids + (size_t)n_ids > r->ids_cap) {
        size_t cap = (r->n_ids + (size_t)n_ids) * 2 + 16;
        int32_t *ni = realloc(r->ids, cap * sizeof *ni);
        if (!ni)
            return;
        r->ids = ni;
        r->ids_cap = cap;
    }
    if (n_ids) /* (the final flush of held-back text comes without ids) */
        memcpy(r->ids + r->n_ids, ids, (size_t)n_ids * sizeof *ids);
    r->n_ids += (size_t)n_ids;
}

static void on_final(void *ctx, void *user, int finish, const bn_usage_t *u, const char *detail)
{
    job_t *j = ctx;
    job_req_t *r = user;
    if (finish == BN_FINISH_ERROR || finish == BN_FINISH_CANCELLED) {
        put(j, bn_batch_error(r->id_json, r->line_no, detail ? detail : bn_finish_name(finish)));
        j->sum->errors++;
    } else {
        put(j, bn_batch_answer(r->id_json, r->text ? r->text : "", r->len, r->ids, r->n_ids, finish, u));
        j->sum->answered++;
        j->sum->prompt_tokens += u->prompt_tokens;
        j->sum->completion_tokens += u->completion_tokens;
    }
    free(r->id_json);
    free(r->text);
    free(r->ids);
    free(r);
}

static int blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isspace((unsigned char)s[i]))
            return 0;
    return 1;
}

int bn_batch_job_run(const bn_batch_job_t *jb, bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m,
                     const bn_tokenizer_t *tok, bn_batch_summary_t *sum, char *err, size_t errlen)
{
    memset(sum, 0, sizeof *sum);
    double t0 = bn_now_s();
    bn_batch_done_t *done = NULL, *seen = NULL;
    bn_sched_t *s = NULL;
    FILE *in = NULL;
    char *line = NULL;
    size_t cap = 0;
    job_t j = { .fd = -1, .path = jb->out, .sum = sum };
    int rc = bn_batch_done_load(jb->out, &done, err, errlen);
    if (rc == BN_OK && bn_batch_done_new(&seen) != BN_OK)
        rc = bn_err(err, errlen, BN_ENOMEM, "out of memory");
    if (rc)
        goto out;
    if (!(in = fopen(jb->in, "rb"))) {
        rc = bn_err(err, errlen, BN_EIO, "%s: cannot open: %s", jb->in, strerror(errno));
        goto out;
    }
    if ((j.fd = open(jb->out, O_WRONLY | O_APPEND | O_CREAT, 0644)) < 0) {
        rc = bn_err(err, errlen, BN_EIO, "%s: cannot open for writing: %s", jb->out, strerror(errno));
        goto out;
    }
    if (bn_batch_done_count(done))
        BN_INFO("%s already answers %zu lines: they are skipped", jb->out, bn_batch_done_count(done));
    bn_sched_sink_t sink = { .ctx = &j, .on_text = on_text, .on_final = on_final };
    bn_sched_opts_t so = { .max_seqs = jb->max_seqs, .max_queue = jb->max_seqs, .step_tokens = BN_STEP_MAX,
                           .n_ctx = jb->n_ctx };
    if ((rc = bn_sched_new(eng, plan, m, tok, &so, &sink, &s, err, errlen)))
        goto out;
    int eof = 0, line_no = 0;
    while (!j.failed) {
        /* keep the slots and a queue's worth of requests fed */
        while (!eof && !j.failed && bn_sched_pending(s) < 2 * jb->max_seqs) {
            ssize_t n = getline(&line, &cap, in);
            if (n < 0) {
                eof = 1;
                break;
            }
            line_no++;
            if (n && line[n - 1] == '\n')
                line[--n] = 0;
            if (blank(line, (size_t)n))
                continue;
            char *id = NULL, e[320];
            bn_gen_params_t g;
            int prc = bn_batch_parse(line, (size_t)n, &jb->defaults, &id, &g, e, sizeof e);
            if (id ? bn_batch_done_has_id(done, id) : bn_batch_done_has_line(done, line_no)) {
                sum->skipped++; /* answered by an earlier run */
                if (id)
                    bn_batch_done_add(seen, id);
                free(id);
                bn_gen_params_free(&g);
                continue;
            }
            if (id && bn_batch_done_has_id(seen, id)) { /* the first line keeps the id */
                char msg[400];
                snprintf(msg, sizeof msg, "duplicate id %s", id);
                BN_WARN("%s line %d: %s", jb->in, line_no, msg);
                put(&j, bn_batch_error(NULL, line_no, msg));
                sum->errors++;
                free(id);
                bn_gen_params_free(&g);
                continue;
            }
            if (id && bn_batch_done_add(seen, id) != BN_OK)
                prc = bn_err(e, sizeof e, BN_ENOMEM, "out of memory");
            job_req_t *r = prc == BN_OK ? calloc(1, sizeof *r) : NULL;
            if (prc == BN_OK && !r)
                prc = bn_err(e, sizeof e, BN_ENOMEM, "out of memory");
            if (prc == BN_OK) {
                uint64_t sid;
                r->id_json = id;
                r->line_no = line_no;
                prc = bn_sched_submit(s, &g, r, &sid, e, sizeof e); /* takes g, also on failure */
                if (prc == BN_OK)
                    continue; /* r and id now belong to the request */
                free(r);
            } else {
                bn_gen_params_free(&g);
            }
            BN_WARN("%s line %d: %s", jb->in, line_no, e);
            put(&j, bn_batch_error(id, line_no, e));
            sum->errors++;
            free(id);
        }
        if (eof && !bn_sched_pending(s))
            break;
        if ((rc = bn_sched_pump(s, 1e9, err, errlen)))
            goto out;
    }
    if (j.failed)
        rc = bn_err(err, errlen, j.failed, "%s", j.err);
out:
    bn_sched_destroy(&s);
    free(line);
    if (in)
        fclose(in);
    if (j.fd >= 0 && close(j.fd) != 0 && rc == BN_OK)
        rc = bn_err(err, errlen, BN_EIO, "%s: %s", jb->out, strerror(errno));
    bn_batch_done_destroy(&done);
    bn_batch_done_destroy(&seen);
    sum->seconds = bn_now_s() - t0;
    return rc;
}
