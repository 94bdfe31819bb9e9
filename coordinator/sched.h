/* sched.h - rank 0's scheduler: requests, sequences, KV memory, continuous batching.
 *
 * What it is: the one owner of every request from the moment it is accepted to
 * its final event. A request is checked and tokenized when submitted (a bad one is
 * refused at once and nothing is kept), waits in a bounded queue, and is admitted
 * to a sequence slot of the least-loaded replica when a slot is free and the
 * replica's KV memory budget holds its whole length (prompt + max_tokens, at most
 * the context). Each step a replica takes, the scheduler builds from every running
 * sequence of that replica: the decode tokens of all sequences not waiting for a
 * token, then chunks of prompts under the step's token budget, so a long prompt
 * never stalls the streams already decoding, and every weight block is read once
 * per step for all of them. Steps go to the engine without waiting (engine.h); as
 * they come back, tokens are detokenized into whole UTF-8 characters, matched
 * against stop strings (held back while they could still be the start of one,
 * never sent), and handed to the sink. Cancel, a deadline and a vanished client
 * end a sequence at the next step boundary; its slot's KV memory goes back to the
 * system with the next step to its replica.
 * Prefix reuse: every slot remembers the tokens whose keys and values it holds.
 * A request starting with tokens that a running sequence has already been given
 * gets that prefix copied into its slot (bn_step_t.copy) instead of computing
 * it; a sequence that ends keeps its slot's memory as a cached prefix (within
 * prefix_cache bytes, and within kv_budget with the running ones; the least
 * recently used goes first when room or a slot is needed; one unused for
 * prefix_ttl_s goes back to the system), and a later request
 * that starts the same way takes the slot over as it is. At least one prompt
 * token is always computed (its logits give the first token); the logits are
 * the same bits as without reuse, as the keys and values are.
 * What it is not: a socket (net/server.c, or main.c's command line, are sinks).
 * A sequence's tokens do not depend on which others share its steps: the forward
 * pass is batch-invariant (tests/test_batch.c).
 * Not thread safe: rank 0's main thread (it drives the engine, which calls MPI). */
#ifndef BN_SCHED_H
#define BN_SCHED_H

#include "coordinator/plan.h"
#include "coordinator/request.h"
#include "coordinator/sampler.h"
#include "coordinator/tokenizer.h"
#include "worker/engine.h"
#include "worker/model.h"

typedef struct bn_sched bn_sched_t;

typedef struct {
    int max_seqs;          /* sequence slots per replica (the engine state's n_seq) */
    int max_queue;         /* requests waiting for a slot at most; more: BN_EBUSY */
    int step_tokens;       /* entries per step, 1..BN_STEP_MAX */
    uint32_t n_ctx;
    uint64_t kv_budget;    /* KV bytes the sequences of one replica may hold; 0 = slots alone bound it */
    uint64_t kv_pos_bytes; /* KV bytes one position costs a replica (over its ranks) */
    uint64_t prefix_cache; /* KV bytes of ended sequences a replica keeps for later requests that
                              start with the same tokens (within kv_budget too); 0: none */
    double prefix_ttl_s;   /* a cached prefix unused this long goes back to the system (0: never) */
} bn_sched_opts_t;

/* Where a request's events go. `user` is what bn_sched_submit was given. The
 * sink must not call back into the scheduler except bn_sched_cancel. */
typedef struct {
    void *ctx;
    /* text: whole UTF-8 characters; ids: the tokens sampled since the last call */
    void (*on_text)(void *ctx, void *user, const char *text, size_t len, const int32_t *ids, int n_ids);
    /* the last event of every admitted or queued request */
    void (*on_final)(void *ctx, void *user, int finish, const bn_usage_t *u, const char *detail);
} bn_sched_sink_t;

/* Counters for stats and health. */
typedef struct {
    uint64_t served, rejected, cancelled, prompt_tokens, completion_tokens, steps;
    int running, queued;
    double busy_s;              /* seconds with at least one sequence running */
    double ttft_p50_ms, ttft_p99_ms, itl_p50_ms, itl_p99_ms;
    uint64_t kv_bytes_in_use;   /* positions written by running sequences, every replica */
    uint64_t kv_bytes_reserved; /* their admitted lengths */
    uint64_t kv_bytes_cached;   /* kept by ended sequences for prefix reuse */
    uint64_t prefix_hits;       /* requests that started from another sequence's keys and values */
    uint64_t prefix_tokens;     /* prompt tokens so not computed */
} bn_sched_stats_t;

/* The ids of a prompt text as the model reads it: the chat form when chat is set,
 * special tokens recognised, BOS first when the model asks for it (unless the
 * text already starts with it). *ids is malloc'd. BN_OK or the tokenizer's error. */
int bn_prompt_encode(const bn_model_t *m, const bn_tokenizer_t *tok, const char *text, size_t len, int chat,
                     int32_t **ids, size_t *n, char *err, size_t errlen);

int bn_sched_new(bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m, const bn_tokenizer_t *tok,
                 const bn_sched_opts_t *o, const bn_sched_sink_t *sink, bn_sched_t **out, char *err, size_t errlen);
/* Every request still held gets on_final(cancelled, "server stopped") first. */
void bn_sched_destroy(bn_sched_t **s);

/* Accept a request (p is taken over, also on failure: freed). BN_OK and *id: it
 * will get events; BN_EBUSY: the queue is full; BN_EINVAL / BN_ECONTEXT /
 * BN_ERANGE: bad parameters or a prompt that cannot fit, with a message naming
 * what. Refused requests get no events. */
int bn_sched_submit(bn_sched_t *s, bn_gen_params_t *p, void *user, uint64_t *id, char *err, size_t errlen);
/* End request id (queued or running) at the next step boundary with
 * finish cancelled and `why` as detail. Unknown ids are ignored. */
void bn_sched_cancel(bn_sched_t *s, uint64_t id, const char *why);
/* Cancel every request (shutdown). */
void bn_sched_cancel_all(bn_sched_t *s, const char *why);
/* Admit, submit steps to every replica with room, collect finished steps and
 * send their events. wait_s: when no step has finished yet, wait up to this long
 * for one (only while any is in flight). Returns BN_OK, or the status of a
 * failed step (fatal: the ranks' state cannot be trusted). */
int bn_sched_pump(bn_sched_t *s, double wait_s, char *err, size_t errlen);
/* Steps in flight now (rank 0 should not sleep long while there are). */
int bn_sched_inflight(const bn_sched_t *s);
/* Requests queued or running. */
int bn_sched_pending(const bn_sched_t *s);
/* Work is ready to be submitted now (the caller should pump without sleeping). */
int bn_sched_ready(const bn_sched_t *s);
void bn_sched_stats(const bn_sched_t *s, bn_sched_stats_t *st);

#endif
