/* batch.h - JSONL batch jobs: one request per input line, one answer per output line.
 *
 * What it is: the line formats of `bitnet-worker --batch IN --out OUT` (and,
 * later, `bitnet-client batch`): an input line is {"id": ..., "prompt": "..."}
 * or {"id": ..., "tokens": [...]}, with optional max_tokens, temperature, top_k,
 * top_p, min_p, seed, stop (a string or a list), chat. An output line is
 * {"id", "text", "tokens", "finish_reason", "usage": {...}}, or for a line that
 * cannot run {"id", "line", "error"} (id null when the line has none or repeats
 * an earlier id, so that id stays free for its first line). Output lines are
 * written whole, one write each, in completion order; a job is resumable: the
 * ids (and, for id-less errors, the line numbers) already in OUT are skipped, and
 * a last line cut short by a kill is dropped. Parsing uses cJSON (Debian's
 * libcjson): a hand-written JSON reader of the same care would be larger.
 * Not thread safe: one job per caller. */
#ifndef BN_BATCH_H
#define BN_BATCH_H

#include "coordinator/request.h"

#include <stddef.h>

/* One input line into a request (on top of `defaults`, whose prompt fields are
 * unused) and its id as compact JSON (*id_json, malloc'd; NULL when the line has
 * no usable id). BN_OK, or BN_EINVAL with err naming the field. */
int bn_batch_parse(const char *line, size_t len, const bn_gen_params_t *defaults, char **id_json,
                   bn_gen_params_t *out, char *err, size_t errlen);

/* The answer line (ends with '\n'; malloc'd). Text that is not valid UTF-8 is
 * written with U+FFFD in place of each bad byte (the ids are exact). */
char *bn_batch_answer(const char *id_json, const char *text, size_t len, const int32_t *ids, size_t n_ids,
                      int finish, const bn_usage_t *u);
/* The error line of input line `line_no` (1-based); id_json may be NULL. */
char *bn_batch_error(const char *id_json, int line_no, const char *msg);

/* What OUT already holds. */
typedef struct bn_batch_done bn_batch_done_t;
/* An empty set. BN_OK or BN_ENOMEM. */
int bn_batch_done_new(bn_batch_done_t **out);
/* Read OUT (missing: empty), drop a cut-short last line (the file is truncated
 * to its last newline). BN_OK, BN_EIO, BN_ENOMEM. */
int bn_batch_done_load(const char *path, bn_batch_done_t **out, char *err, size_t errlen);
void bn_batch_done_destroy(bn_batch_done_t **d);
/* Whether this id (compact JSON) or id-less input line was answered. */
int bn_batch_done_has_id(const bn_batch_done_t *d, const char *id_json);
int bn_batch_done_has_line(const bn_batch_done_t *d, int line_no);
/* Remember an id (for duplicates within this run). BN_OK or BN_ENOMEM. */
int bn_batch_done_add(bn_batch_done_t *d, const char *id_json);
size_t bn_batch_done_count(const bn_batch_done_t *d);

/* ---- a whole job through the scheduler (bitnet-worker --batch) ---- */
#include "coordinator/tokenizer.h"
#include "worker/engine.h"
#include "worker/model.h"

typedef struct {
    const char *in, *out;
    bn_gen_params_t defaults;   /* the command line's sampling flags and -n */
    int max_seqs;               /* sequences at once (the engine state's slots) */
    uint32_t n_ctx;
} bn_batch_job_t;

typedef struct {
    size_t answered, skipped, errors;
    uint64_t prompt_tokens, completion_tokens;
    double seconds;
} bn_batch_summary_t;

/* Run the job: every input line not yet answered in OUT gets exactly one line
 * there. BN_OK (bad lines are error lines, not failures), BN_EIO (a file), or the
 * status of a failed step. */
int bn_batch_job_run(const bn_batch_job_t *j, bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m,
                     const bn_tokenizer_t *tok, bn_batch_summary_t *sum, char *err, size_t errlen);

#endif
