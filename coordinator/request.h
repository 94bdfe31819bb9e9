/* request.h - what a client asks for and what it gets back, in plain C: the
 * scheduler (sched.h) works on these; the wire codec (net/wire.h) makes them from
 * protobuf messages and back, and the command line makes them from flags.
 * No allocation rules beyond bn_gen_params_free(). */
#ifndef BN_REQUEST_H
#define BN_REQUEST_H

#include "coordinator/sampler.h"

#include <stddef.h>
#include <stdint.h>

typedef enum {
    BN_FINISH_NONE = 0,
    BN_FINISH_EOS = 1,       /* end-of-text or <|eot_id|> */
    BN_FINISH_LENGTH = 2,    /* max_tokens, or the context is full */
    BN_FINISH_STOP = 3,      /* a stop string */
    BN_FINISH_CANCELLED = 4, /* cancel, deadline, vanished client, shutdown */
    BN_FINISH_ERROR = 5,
} bn_finish_t;
const char *bn_finish_name(int f); /* "eos", "length", "stop", "cancelled", "error" */

#define BN_MAX_STOPS 8        /* stop strings per request */
#define BN_MAX_STOP_LEN 128   /* bytes per stop string */
#define BN_MAX_TOKENS_LIMIT (1u << 24)

/* One generate request. Strings and arrays are owned (bn_gen_params_free). */
typedef struct {
    char *prompt;            /* text, or NULL when tokens are given */
    size_t prompt_len;
    int32_t *tokens;         /* exactly these ids (no BOS added), or NULL */
    size_t n_tokens;
    int chat;                /* wrap the text in the model's chat form */
    int ignore_eos;
    bn_sampler_params_t sp;
    int seed_given;          /* else the scheduler chooses one */
    uint32_t max_tokens;
    char *stop[BN_MAX_STOPS];
    size_t stop_len[BN_MAX_STOPS];
    int n_stop;
    uint32_t deadline_ms;    /* 0 = none */
    char label[136];         /* for the log line: the client's request id ("" = none) */
    int replica;             /* command line only: run on this replica; -1 = any (the default) */
    float *dump_logits;      /* command line only: (prompt tokens, n_vocab) rows, not owned;
                                the prompt is evaluated once, nothing generated */
} bn_gen_params_t;

/* The defaults of bitnet-worker and bitnet-client: temp 0.8, top-k 40, top-p
 * 0.95, min-p 0.05, 64 tokens. */
void bn_gen_params_init(bn_gen_params_t *p);
void bn_gen_params_free(bn_gen_params_t *p);

typedef struct {
    uint32_t prompt_tokens, completion_tokens;
    double ttft_ms;        /* arrival to the first token sampled */
    double tokens_per_s;   /* tokens after the first over their time */
    double total_ms;       /* arrival to the end */
    double queue_ms;       /* arrival to admission */
    double gen_s;          /* first token to last */
    uint64_t seed;
} bn_usage_t;

#endif
