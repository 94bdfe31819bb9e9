/* comm.h - the one module that calls MPI. Everything else asks it.
 *
 * Today it starts MPI (MPI_THREAD_FUNNELED: only the main thread calls MPI), makes
 * errors return (MPI_ERRORS_RETURN) and reports rank and world size; a plain
 * process without mpirun is a world of one. Sharding over ranks arrives with the
 * planner (issue 4). Not thread safe: main thread only. */
#ifndef BN_COMM_H
#define BN_COMM_H

#include <stddef.h>

typedef struct {
    int rank, size;
    int initialized;
} bn_comm_t;

/* Start MPI. BN_OK or BN_ECOMM with MPI's error string in err. */
int bn_comm_init(int *argc, char ***argv, bn_comm_t *c, char *err, size_t errlen);
/* Finish MPI (no-op if never started). */
void bn_comm_finalize(bn_comm_t *c);
/* End every rank of the job with `code` (after a fatal error on one rank). */
void bn_comm_abort(bn_comm_t *c, int code);

#endif
