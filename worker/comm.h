/* comm.h - the one module that calls MPI. Everything else asks it.
 *
 * What it is: MPI start-up (MPI_THREAD_FUNNELED: only the main thread of a rank
 * calls MPI; MPI_ERRORS_RETURN on every communicator, every failure reported
 * with the rank, the call and MPI's error string), the communicators of a plan's
 * grid (a replica's ranks, a stage's tensor ranks, the neighbouring stages), the
 * exchanges of the forward pass (bn_comm_dist fills forward.h's bn_dist_t) and
 * the messages of the step loop (worker/engine.c). A plain process without
 * mpirun is a world of one.
 * Waiting: a rank with no step in flight waits for the next step descriptor with
 * MPI_Test and a growing sleep (Open MPI's blocking calls busy-poll a core, see
 * DESIGN.md section 3); inside a step the exchanges block (and spin).
 * Counters: bytes this rank sends and collectives it joins, for --stats. An
 * allreduce of n floats over T ranks is our own ring (reduce-scatter then
 * allgather, 2 (T-1) / T * 4n bytes sent per rank, the least any allreduce
 * sends), so every rank gets bit-identical sums; an allgather of n bytes
 * counts (T - 1) * n, a point-to-point message its payload.
 * Not thread safe: main thread only. */
#ifndef BN_COMM_H
#define BN_COMM_H

#include "worker/dist.h"

#include <stddef.h>
#include <stdint.h>

typedef struct bn_comm_grid bn_comm_grid_t;

typedef struct {
    int rank, size;
    int initialized;
    int node_ranks;           /* ranks on the node with the fewest (MPI_COMM_TYPE_SHARED) */
    int local_ranks;          /* ranks on this rank's node */
    bn_comm_grid_t *g;        /* after bn_comm_grid */
    /* this rank's counters */
    uint64_t bytes_sent;      /* payload handed to MPI, counted as above */
    uint64_t collectives;     /* allreduces and allgathers joined */
    uint64_t messages;        /* point-to-point messages sent */
    double t_comm;            /* seconds inside exchanges and messages of steps */
    double t_wait;            /* seconds idle, waiting for a step or for the stage before */
} bn_comm_t;

/* Start MPI. BN_OK or BN_ECOMM with MPI's error string in err. */
int bn_comm_init(int *argc, char ***argv, bn_comm_t *c, char *err, size_t errlen);
/* Finish MPI (no-op if never started). */
void bn_comm_finalize(bn_comm_t *c);
/* End every rank of the job with `code` (after a fatal error on one rank). */
void bn_comm_abort(bn_comm_t *c, int code);

/* The communicators of an R x P x T grid (rank = (replica * P + stage) * T + tp).
 * Collective over the world. BN_OK, BN_ENOMEM or BN_ECOMM. */
int bn_comm_grid(bn_comm_t *c, int R, int P, int T, char *err, size_t errlen);
/* The exchanges of this rank's stage and its neighbours, for bn_state_set_dist. */
void bn_comm_dist(bn_comm_t *c, bn_dist_t *d);

/* Step descriptors (fixed size `len`): rank 0 sends one to every rank of replica
 * r; the ranks of that replica receive it (rank 0 too, when r is 0: it then gets
 * its own). bn_comm_step_recv waits without burning a core. */
int bn_comm_step_send(bn_comm_t *c, int replica, void *buf, size_t len, char *err, size_t errlen);
int bn_comm_step_recv(bn_comm_t *c, void *buf, size_t len, char *err, size_t errlen);

/* Point-to-point messages of a step (results to rank 0, tail draws back). */
int bn_comm_send(bn_comm_t *c, int to, int tag, const void *buf, size_t len, char *err, size_t errlen);
int bn_comm_recv(bn_comm_t *c, int from, int tag, void *buf, size_t len, char *err, size_t errlen);
/* A message sent without waiting for the receiver: the bytes are copied, and
 * the copy lives until its send is done (the ring holds 16; the 17th waits for
 * the first). Messages to one rank with one tag arrive in the order sent. */
int bn_comm_send_async(bn_comm_t *c, int to, int tag, const void *buf, size_t len, char *err, size_t errlen);
/* *ready = 1 when a message from `from` with `tag` is waiting (bn_comm_recv
 * then takes it at once). */
int bn_comm_probe(bn_comm_t *c, int from, int tag, int *ready, char *err, size_t errlen);

/* Rank 0 gets every rank's `len` bytes in rank order (out: size * len; others
 * may pass NULL). Collective over the world. */
int bn_comm_gather(bn_comm_t *c, const void *in, size_t len, void *out, char *err, size_t errlen);
/* The smallest of every rank's v, on every rank. Collective over the world. */
int bn_comm_min_u64(bn_comm_t *c, uint64_t *v, char *err, size_t errlen);

#endif
