/* engine.h - the steps of a sharded model, submitted and polled (DESIGN.md section 5).
 *
 * What it is: rank 0 submits steps; each step descriptor (the entries to
 * evaluate, each wanting entry's sampling parameters, the sequence slots whose
 * KV memory to give back, what it wants back) goes to the ranks of one replica,
 * which all run their part of bn_forward (stages hand the residual stream on,
 * tensor ranks exchange partial sums). The ranks of the replica's last stage then
 * send rank 0 what it asked for: each one's candidates and softmax statistics of
 * its vocabulary slice (coordinator/sampler.h), from which rank 0 draws the
 * tokens with the entries' samplers; for --dump-logits, the rows of logits; or,
 * for a step that wants nothing, one small acknowledgement, so rank 0 always
 * knows which steps are done. Submitting does not wait for results: several
 * replicas' steps, and up to `P` steps of one replica's pipeline, are in flight
 * at once, and bn_engine_poll() collects whichever finished. Rank 0 computes its
 * own part of replica 0's steps inside bn_engine_submit (it is one of that
 * replica's ranks). Steps of one replica finish in the order submitted.
 * Every other rank sits in bn_engine_serve() until rank 0 sends the stop step;
 * waiting there costs no CPU (comm.h). A world of one runs the same code with no
 * messages.
 * Not thread safe: main thread only. */
#ifndef BN_ENGINE_H
#define BN_ENGINE_H

#include "worker/comm.h"
#include "worker/forward.h"
#include "worker/shard.h"
#include "worker/slice.h"

#define BN_STEP_MAX 64 /* entries per step */

enum { BN_WANT_NONE = 0, BN_WANT_SAMPLE = 1, BN_WANT_LOGITS = 2 };

/* Positions 0..n-1 of slot src into slot dst, on every rank of the replica
 * (each for its own layers and KV heads: bn_kvcache_copy), before the step's
 * releases and entries: a prompt prefix computed once and reused
 * (coordinator/sched.c) */
#define BN_STEP_COPY_MAX 16
typedef struct {
    int32_t src, dst;
    uint32_t n;
} bn_kv_copy_t;

typedef struct bn_engine bn_engine_t;

/* What the steps of one phase cost this rank (--stats): steps with only prompt
 * tokens and steps with generated tokens are counted apart. */
enum { BN_PHASE_PROMPT = 0, BN_PHASE_GEN = 1, BN_PHASES = 2 };
typedef struct {
    uint64_t steps, bytes_sent, collectives, messages;
    double t_step;   /* seconds inside steps */
    double t_comm;   /* of which exchanging */
    double t_wait;   /* waiting: for the step to arrive, the stage before, results */
} bn_phase_stats_t;

/* A step to submit (rank 0). */
typedef struct {
    int n;                                /* entries, 0..BN_STEP_MAX */
    int want;                             /* BN_WANT_* for the entries with want_logits */
    int phase;                            /* BN_PHASE_* (for --stats) */
    bn_batch_entry_t e[BN_STEP_MAX];
    void *smp[BN_STEP_MAX];               /* BN_WANT_SAMPLE: the k-th wanting entry's sampler
                                             (the picker's); alive until the step is done */
    float *logits;                        /* BN_WANT_LOGITS: (k, n_vocab), the caller's, until done */
    int n_release;
    int n_copy;
    bn_kv_copy_t copy[BN_STEP_COPY_MAX];  /* prompt prefixes copied between slots first */
    int32_t release[BN_STEP_MAX];         /* then the sequence slots whose KV memory goes back */
} bn_step_t;

/* A finished step (rank 0). */
typedef struct {
    uint64_t ticket;                      /* bn_engine_submit's */
    int replica;
    int k;                                /* entries that wanted logits */
    int32_t tokens[BN_STEP_MAX];          /* BN_WANT_SAMPLE: the k-th wanting entry's token */
} bn_step_done_t;

/* How rank 0 draws tokens from the slices' candidates: the scheduler's samplers
 * (coordinator/sampler.h), which the engine holds as opaque pointers. */
typedef struct {
    const bn_sampler_params_t *(*params)(const void *smp);
    bn_pick_t (*pick)(void *smp, const bn_slice_stats_t *st, int n_slices, const bn_cand_t *cand);
} bn_picker_t;

/* An engine over this rank's model part and state (not owned), the plan and comm
 * (not owned; comm's grid already made). */
int bn_engine_new(bn_comm_t *comm, const bn_plan_t *plan, const bn_model_t *m, bn_state_t *st,
                  bn_engine_t **out, char *err, size_t errlen);
void bn_engine_destroy(bn_engine_t **e);
/* Rank 0: the picker of steps that want samples (copied). */
void bn_engine_set_picker(bn_engine_t *e, const bn_picker_t *p);

/* Rank 0: how many more steps replica r takes now (0 while an exclusive step is
 * in flight there). A step is exclusive, and needs an idle replica, when it wants
 * logits or may draw past the candidates (plain temperature sampling): its
 * results go back and forth before the replica's last stage may go on. */
int bn_engine_room(const bn_engine_t *e, int replica);
/* Rank 0: steps submitted and not yet returned by bn_engine_poll, on replica r
 * (r < 0: on all). */
int bn_engine_inflight(const bn_engine_t *e, int replica);
/* Rank 0: send step s to replica r (and compute rank 0's part of it when r is 0).
 * BN_OK and *ticket; BN_EBUSY when the replica has no room; BN_EINVAL for a bad
 * step; or the status of a failed exchange. */
int bn_engine_submit(bn_engine_t *e, int replica, const bn_step_t *s, uint64_t *ticket, char *err, size_t errlen);
/* Rank 0: a finished step into *done: returns 1, or 0 when none has finished
 * within wait_s seconds (0: do not wait; nothing in flight: at once), or a
 * status < 0. Waiting sleeps in growing naps after a short spin. */
int bn_engine_poll(bn_engine_t *e, double wait_s, bn_step_done_t *done, char *err, size_t errlen);
/* Rank 0: submit and wait for that one step (nothing else may be in flight). */
int bn_engine_run(bn_engine_t *e, int replica, const bn_step_t *s, bn_step_done_t *done, char *err, size_t errlen);
/* Rank 0: end bn_engine_serve on every other rank (nothing may be in flight). */
int bn_engine_stop(bn_engine_t *e, char *err, size_t errlen);
/* Every rank but 0: run the steps rank 0 sends until it says stop. */
int bn_engine_serve(bn_engine_t *e, char *err, size_t errlen);
const bn_phase_stats_t *bn_engine_stats(const bn_engine_t *e, int phase);

#endif
