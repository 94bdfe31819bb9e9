/* cli.h - rank 0's side of a command-line run: one prompt through the scheduler.
 *
 * What it is: the prompt (text, a file or ids) becomes one request of the same
 * scheduler the server uses (sched.h): --tokenize prints its ids, --dump-logits
 * writes every position's logits, otherwise the generated text streams to stdout
 * (exactly what bitnet-client prints for the same request).
 * Not thread safe: rank 0's main thread. */
#ifndef BN_CLI_H
#define BN_CLI_H

#include "coordinator/request.h"
#include "coordinator/tokenizer.h"
#include "worker/engine.h"
#include "worker/model.h"

typedef struct {
    const char *prompt, *prompt_file, *tokens, *dump_logits;
    int tokenize, print_ids;
    int replica;                 /* the replica that runs it */
    bn_gen_params_t gen;         /* sampling, length, chat, ignore_eos (prompt fields unused) */
} bn_cli_opts_t;

typedef struct {
    int n_prompt, n_gen;
    double t_prompt, t_gen;      /* prompt: arrival to first token; generation: first token to last */
} bn_cli_result_t;

/* Run it. BN_OK, or a status with err naming what was wrong (a bad prompt or
 * flag: BN_EINVAL/BN_ECONTEXT; a failed step: that status). */
int bn_cli_run(const bn_cli_opts_t *o, bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m,
               const bn_tokenizer_t *tok, uint32_t n_ctx, bn_cli_result_t *res, char *err, size_t errlen);

#endif
