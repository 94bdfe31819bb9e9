/* batch_job.h - a whole JSONL job through rank 0's scheduler, in-process
 * (bitnet-worker --batch IN --out OUT, also under mpirun); the line formats and
 * files are batch.h's. */
#ifndef BN_BATCH_JOB_H
#define BN_BATCH_JOB_H

#include "coordinator/batch.h"
#include "coordinator/tokenizer.h"
#include "worker/engine.h"
#include "worker/model.h"

#include <signal.h>

typedef struct {
    const char *in, *out;
    bn_gen_params_t defaults;   /* the command line's sampling flags and -n */
    int max_seqs;               /* sequences at once (the engine state's slots) */
    uint64_t prefix_cache;      /* bn_sched_opts_t's (0: no prefix reuse) */
    uint64_t kv_pos_bytes;      /* bn_sched_opts_t's */
    uint32_t n_ctx;
    /* set (by a signal handler) to stop: no new lines; the running ones get
     * drain_s seconds to finish, then they are dropped (not written: the next
     * run does them). A second raise (stop >= 2) drops them at once. */
    volatile sig_atomic_t *stop;
    double drain_s;
} bn_batch_job_t;

/* Run the job: every input line not yet answered in OUT gets exactly one line
 * there. BN_OK (bad lines are error lines, not failures; *stopped says whether a
 * stop left lines for a next run), BN_EIO/BN_EBUSY (a file), or the status of a
 * failed step. */
int bn_batch_job_run(const bn_batch_job_t *j, bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m,
                     const bn_tokenizer_t *tok, bn_batch_summary_t *sum, int *stopped, char *err, size_t errlen);

#endif
