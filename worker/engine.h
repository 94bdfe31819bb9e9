/* engine.h - the step loop of a sharded model (DESIGN.md section 5).
 *
 * What it is: rank 0 drives every step. It sends a small fixed-size step
 * descriptor (the entries to evaluate and what it wants back) to the ranks of one
 * replica; each of them runs its part of bn_forward (stages hand the residual
 * stream on, tensor ranks exchange partial sums); the ranks of the replica's last
 * stage then send rank 0 what it asked for: each one's candidates and softmax
 * statistics of its vocabulary slice (coordinator/sampler.h), from which rank 0
 * draws the token, or, for --dump-logits, the rows of logits themselves. Rank 0
 * returns from a step that wants nothing as soon as its own part is done, so a
 * prompt's chunks flow through the stages one behind the other.
 * Every other rank sits in bn_engine_serve() until rank 0 sends the stop step;
 * waiting there costs no CPU (comm.h). A world of one runs the same code with no
 * messages.
 * Not thread safe: main thread only. */
#ifndef BN_ENGINE_H
#define BN_ENGINE_H

#include "coordinator/plan.h"
#include "coordinator/sampler.h"
#include "worker/comm.h"
#include "worker/forward.h"

#define BN_STEP_MAX 64 /* entries per step */

enum { BN_WANT_NONE = 0, BN_WANT_SAMPLE = 1, BN_WANT_LOGITS = 2 };

typedef struct bn_engine bn_engine_t;

/* What the steps of one phase cost this rank (--stats): the prompt's steps and
 * the generation's are counted apart. */
enum { BN_PHASE_PROMPT = 0, BN_PHASE_GEN = 1, BN_PHASES = 2 };
typedef struct {
    uint64_t steps, bytes_sent, collectives, messages;
    double t_step;   /* seconds inside steps */
    double t_comm;   /* of which exchanging */
    double t_wait;   /* waiting: for the step to arrive, the stage before, results */
} bn_phase_stats_t;

/* An engine over this rank's model part and state (not owned), the plan and comm
 * (not owned; comm's grid already made), sampling with sp on the last stage. */
int bn_engine_new(bn_comm_t *comm, const bn_plan_t *plan, const bn_model_t *m, bn_state_t *st,
                  const bn_sampler_params_t *sp, bn_engine_t **out, char *err, size_t errlen);
void bn_engine_destroy(bn_engine_t **e);

/* Rank 0: evaluate n <= BN_STEP_MAX entries on replica `replica`. want:
 * BN_WANT_NONE; BN_WANT_SAMPLE: tokens[i] gets a token drawn with samplers[i] for
 * the i-th entry that wants logits; BN_WANT_LOGITS: logits gets one row of
 * n_vocab floats per entry that wants them. */
int bn_engine_step(bn_engine_t *e, int replica, const bn_batch_entry_t *ents, int n, int want,
                   bn_sampler_t **samplers, int32_t *tokens, float *logits, char *err, size_t errlen);
/* Rank 0: end bn_engine_serve on every other rank. */
int bn_engine_stop(bn_engine_t *e, char *err, size_t errlen);
/* Every rank but 0: run the steps rank 0 sends until it says stop. */
int bn_engine_serve(bn_engine_t *e, char *err, size_t errlen);
/* Rank 0: the phase the next steps belong to (sent with them). */
void bn_engine_set_phase(bn_engine_t *e, int phase);
const bn_phase_stats_t *bn_engine_stats(const bn_engine_t *e, int phase);

#endif
