/* client.h - what the parts of bitnet-client share: its options, messages, and
 * the socket. client.c is the command line and the one-request commands;
 * batch.c is `bitnet-client batch`. Not a library: only main exits. */
#ifndef BN_CLIENT_H
#define BN_CLIENT_H

#include "coordinator/request.h"
#include "proto/bitnet.pb-c.h"

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#define KEY_LEN 40                         /* a CURVE key in Z85 */
#define PROTOCOL_VERSION 1
#define EXIT_USAGE 2
#define EXIT_LEFT 3                        /* batch: lines left for a rerun */
#define EXIT_INTERRUPTED 130

typedef enum { CMD_GENERATE, CMD_INFO, CMD_HEALTH, CMD_STATS, CMD_KEYGEN, CMD_BATCH } cmd_t;

typedef struct {
    cmd_t cmd;
    const char *server, *keygen_file;
    char server_key[KEY_LEN + 1];          /* "" = no CURVE */
    char *id;                              /* --id, or made up by run() */
    char *prompt, *prompt_file;            /* point into argv */
    int32_t *tokens;                       /* --tokens, parsed (owned) */
    size_t n_tokens;
    char **stop;                           /* --stop strings (array owned, strings in argv) */
    size_t n_stop;
    long long n_predict, top_k, deadline_ms;   /* deadline_ms -1: not sent */
    double temp, top_p, min_p, timeout_s;
    uint64_t seed;
    int seed_given, chat, ignore_eos, print_ids, usage;
    const char *batch_in, *batch_out;      /* batch IN OUT */
    long long concurrency;                 /* batch: requests in flight */
    char *endpoint_buf;                    /* --endpoint-file's endpoint (owned) */
    int server_set;                        /* --server or --endpoint-file given */
} options_t;

extern volatile sig_atomic_t g_signals;    /* SIGINT and SIGTERM seen */
extern int g_verbose;

/* "bitnet-client: <message>" on stderr; returns -1. */
int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Only with --verbose; the format must be a string literal. */
#define debug(...) do { if (g_verbose) fail("debug: " __VA_ARGS__); } while (0)
/* A failed zmq call (errno set by libzmq); returns exit status 1. */
int zfail(const char *what);
double now_ms(void);
/* SIGINT and SIGTERM count into g_signals (no SA_RESTART: zmq_poll returns EINTR). */
void catch_signals(void);

/* The command line's generation flags as a request's defaults; strings point
 * into argv (never bn_gen_params_free this). */
void gen_defaults(const options_t *o, bn_gen_params_t *g);
/* A generate request for g under request id `id`: 0 or exit status 1. */
int send_generate(void *sock, const char *id, const bn_gen_params_t *g);
/* The packed size of that request (to check against the server's limit). */
size_t generate_size(const char *id, const bn_gen_params_t *g);
/* info, health, stats or cancel (requests without fields) for request `id`:
 * 0 or exit status 1. */
int send_empty(void *sock, const char *id, Bitnet__Request__BodyCase body);
/* A DEALER (in *sock_out, even on failure) connected to o->server; 0, or an exit
 * status after a message. */
int open_socket(const options_t *o, void *ctx, void **sock_out);

/* bitnet-client batch IN OUT: the exit status. */
int run_batch(options_t *o);

#endif
