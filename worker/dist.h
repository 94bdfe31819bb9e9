/* dist.h - the exchanges a sharded forward pass needs, as function pointers.
 *
 * forward.c says where a sync happens (after o, after down, at each sub-norm);
 * comm.c says how (MPI) by filling this table; neither includes the other. */
#ifndef BN_DIST_H
#define BN_DIST_H

#include <stddef.h>

/* How a rank that holds part of the model talks to the others (worker/comm.c
 * fills it; forward.c never calls MPI). Each call returns BN_OK or a status with
 * a message naming the rank and the MPI call. */
typedef struct {
    int tp;                 /* tensor ranks in this stage; 1 = no exchanges */
    void *ctx;
    /* x (n floats) = the sum of every tensor rank's x, the same on all of them */
    int (*allreduce_sum)(void *ctx, float *x, size_t n, char *err, size_t errlen);
    /* out (tp * bytes) = every tensor rank's `in` (bytes), in rank order */
    int (*allgather)(void *ctx, const void *in, size_t bytes, void *out, char *err, size_t errlen);
    /* the residual stream (n floats) from the previous stage / to the next one */
    int (*recv_prev)(void *ctx, float *x, size_t n, char *err, size_t errlen);
    int (*send_next)(void *ctx, const float *x, size_t n, char *err, size_t errlen);
} bn_dist_t;

#endif
