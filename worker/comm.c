/* comm.c - MPI start-up and shut-down; see comm.h. The only file that includes mpi.h. */
#include "worker/comm.h"

#include "proto/status.h"

#include <mpi.h>

static int mpi_fail(int rc, const char *call, int rank, char *err, size_t errlen)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS)
        len = 0;
    msg[len] = 0;
    return bn_err(err, errlen, BN_ECOMM, "rank %d: %s failed: %s", rank, call, len ? msg : "unknown error");
}

int bn_comm_init(int *argc, char ***argv, bn_comm_t *c, char *err, size_t errlen)
{
    int provided = 0;
    c->rank = 0;
    c->size = 1;
    int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Init_thread", -1, err, errlen);
    c->initialized = 1;
    if ((rc = MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN)) != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Comm_set_errhandler", -1, err, errlen);
    if ((rc = MPI_Comm_rank(MPI_COMM_WORLD, &c->rank)) != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Comm_rank", -1, err, errlen);
    if ((rc = MPI_Comm_size(MPI_COMM_WORLD, &c->size)) != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Comm_size", c->rank, err, errlen);
    if (provided < MPI_THREAD_FUNNELED)
        return bn_err(err, errlen, BN_ECOMM, "rank %d: MPI provides thread level %d, FUNNELED needed",
                      c->rank, provided);
    return BN_OK;
}

void bn_comm_finalize(bn_comm_t *c)
{
    if (c->initialized)
        MPI_Finalize();
    c->initialized = 0;
}

void bn_comm_abort(bn_comm_t *c, int code)
{
    if (c->initialized)
        MPI_Abort(MPI_COMM_WORLD, code);
}
