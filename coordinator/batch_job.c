/* batch_job.c - a JSONL job through rank 0's scheduler (bitnet-worker --batch); see batch_job.h. */
#include "coordinator/batch_job.h"
#include "coordinator/sched.h"

#include "base/log.h"
#include "base/status.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    bn_batch_file_t *f;
    int dropping;     /* stopped: cancelled lines are not written (the next run does them) */
    size_t dropped;
    int failed;       /* writing OUT failed: stop reading */
    char err[256];
} job_t;

static void on_text(void *ctx, void *user, const char *text, size_t len, const int32_t *ids, int n_ids)
{
    bn_batch_item_append(user, text, len, ids, (size_t)n_ids);
}

static void on_final(void *ctx, void *user, int finish, const bn_usage_t *u, const char *detail)
{
    job_t *j = ctx;
    if (j->dropping && finish == BN_FINISH_CANCELLED) {
        bn_batch_item_free(user);
        j->dropped++;
        return;
    }
    int rc = bn_batch_file_finish(j->f, user, finish, u, detail, j->err, sizeof j->err);
    if (rc && !j->failed)
        j->failed = rc;
}

int bn_batch_job_run(const bn_batch_job_t *jb, bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m,
                     const bn_tokenizer_t *tok, bn_batch_summary_t *sum, int *stopped, char *err, size_t errlen)
{
    memset(sum, 0, sizeof *sum);
    *stopped = 0;
    bn_sched_t *s = NULL;
    job_t j = { 0 };
    int rc = bn_batch_file_open(jb->in, jb->out, &jb->defaults, &j.f, err, errlen);
    if (rc)
        return rc;
    bn_sched_sink_t sink = { .ctx = &j, .on_text = on_text, .on_final = on_final };
    bn_sched_opts_t so = { .max_seqs = jb->max_seqs, .max_queue = jb->max_seqs, .step_tokens = BN_STEP_MAX,
                           .n_ctx = jb->n_ctx, .prefix_cache = jb->prefix_cache,
                           .kv_pos_bytes = jb->kv_pos_bytes };
    if ((rc = bn_sched_new(eng, plan, m, tok, &so, &sink, &s, err, errlen)))
        goto out;
    int eof = 0;
    double drain_until = 0;
    while (!j.failed) {
        int stop = jb->stop ? *jb->stop : 0;
        if (stop && !eof) { /* no new lines; the running ones get drain_s */
            eof = 1;
            *stopped = 1;
            drain_until = bn_now_s() + jb->drain_s;
            BN_WARN("stopping: %d running lines get %.0f s to finish; the rest is left for the next run",
                    bn_sched_pending(s), jb->drain_s);
        }
        if (*stopped && !j.dropping && (stop >= 2 || bn_now_s() >= drain_until)) {
            j.dropping = 1;
            bn_sched_cancel_all(s, "stopped");
        }
        /* keep the slots and a queue's worth of requests fed */
        while (!eof && !j.failed && bn_sched_pending(s) < 2 * jb->max_seqs) {
            bn_batch_item_t *it;
            bn_gen_params_t g;
            int nrc = bn_batch_file_next(j.f, &it, &g, j.err, sizeof j.err);
            if (nrc == 1) {
                eof = 1;
            } else if (nrc) {
                j.failed = nrc;
            } else {
                char e[320];
                uint64_t sid;
                if ((nrc = bn_sched_submit(s, &g, it, &sid, e, sizeof e)) != BN_OK && /* takes g */
                    (nrc = bn_batch_file_reject(j.f, it, e, j.err, sizeof j.err)) != BN_OK)
                    j.failed = nrc;
            }
        }
        /* done when no line is left and no step is out: with several replicas, a
         * step giving back a finished line's KV memory may still be in flight
         * when the last line ends, and the engine stops only idle replicas */
        if (eof && !bn_sched_pending(s) && !bn_sched_inflight(s))
            break;
        if ((rc = bn_sched_pump(s, 0.5, err, errlen)))
            goto out;
    }
    if (j.failed)
        rc = bn_err(err, errlen, j.failed, "%s", j.err);
out:
    j.dropping = 1; /* what a failed step leaves running is not answered: the next run does it */
    bn_sched_stats_t ss = { 0 };
    if (s)
        bn_sched_stats(s, &ss);
    bn_sched_destroy(&s);
    bn_batch_file_summary(j.f, sum);
    sum->reused_tokens = ss.prefix_tokens;
    if (j.dropped)
        BN_INFO("%zu lines were running when the job stopped; the next run does them", j.dropped);
    char e2[256];
    int crc = bn_batch_file_close(&j.f, e2, sizeof e2);
    if (crc && rc == BN_OK)
        rc = bn_err(err, errlen, crc, "%s", e2);
    return rc;
}
