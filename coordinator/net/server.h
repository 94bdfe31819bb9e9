/* server.h - rank 0's service: a ZeroMQ ROUTER in front of the scheduler.
 *
 * What it is: the one file that calls ZeroMQ on the server side. It binds a
 * ROUTER (ZMQ_ROUTER_MANDATORY, so a send to a client that is gone fails and its
 * request is cancelled; ZMQ_MAXMSGSIZE as a hard guard at 4x the message limit,
 * beyond which libzmq drops the connection without a word; below it, a message
 * over the limit gets an error reply), optionally with CURVE, and runs rank 0's
 * loop: read what clients sent, pump the scheduler, sleep in zmq_poll only when
 * no step is in flight or ready. Every request frame is decoded by wire.c; a bad
 * one gets an error reply and nothing else changes. SIGINT/SIGTERM/SIGUSR1: stop
 * accepting (new requests get BN_ESTOPPING "shutting down"), let running requests
 * finish for drain_s seconds, cancel the rest, answer everyone, return.
 * MPI stays on this (the main) thread: the engine is driven from the loop.
 * Not thread safe: rank 0's main thread. */
#ifndef BN_SERVER_H
#define BN_SERVER_H

#include "coordinator/sched.h"
#include "coordinator/tokenizer.h"
#include "worker/engine.h"
#include "worker/kvcache.h"
#include "worker/model.h"

typedef struct {
    const char *bind;              /* endpoint, e.g. tcp://127.0.0.1:5555 (port * = any free one) */
    const char *curve_secret_file; /* NULL: no CURVE */
    double drain_s;                /* after a signal, how long running requests may finish */
    const char *endpoint_file;     /* NULL, or where to write endpoint= and server_key= once bound */
    uint32_t max_msg_bytes;        /* a request over this gets an error reply */
    bn_sched_opts_t sched;
    /* for info */
    const char *model_path, *plan_text, *kernels, *lm_head, *kv_type;
    int threads;
    const bn_kvcache_t *kv;        /* rank 0's KV cache, for stats (its resident pages) */
} bn_server_opts_t;

/* Serve until a signal. BN_OK after a clean stop; BN_EIO / BN_EDENIED for a bad
 * endpoint or key file (nothing served); or the status of a failed step (fatal). */
int bn_server_run(const bn_server_opts_t *o, bn_engine_t *eng, const bn_plan_t *plan, const bn_model_t *m,
                  const bn_tokenizer_t *tok, char *err, size_t errlen);

#endif
