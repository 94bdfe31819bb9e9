/* comm.c - MPI for bitnet-worker; see comm.h. The only file that includes mpi.h. */
#include "worker/comm.h"

#include "base/status.h"
#include "base/log.h"

#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { TAG_STEP = 1, TAG_ACT = 2, TAG_RING = 3 }; /* bn_comm_send tags start at 16 */
enum { STEP_RING = 8 }; /* step descriptors rank 0 may have in flight */
enum { ASYNC_RING = 16 }; /* messages bn_comm_send_async may have in flight */

struct bn_comm_grid {
    int R, P, T, replica, stage, tp;
    MPI_Comm replica_comm, stage_comm;
    int prev, next;    /* world ranks of the same tensor rank in the stages around; -1 */
    int leader;        /* world rank of this replica's first rank */
    bn_comm_t *c;
    /* rank 0: steps in flight to its own replica. The root of a broadcast cannot
     * finish before the others join it, and a later stage joins only when it is
     * done with the step before: waiting there would stop stage 0 from starting
     * the next chunk of a prompt while the next stage works on this one. */
    MPI_Request sreq[STEP_RING];
    void *sbuf[STEP_RING];
    size_t scap;
    int snext;
    float *ring;       /* the allreduce's receive chunk, grown as needed */
    size_t ring_cap;
    /* bn_comm_send_async's copies, each until its send is done */
    MPI_Request areq[ASYNC_RING];
    void *abuf[ASYNC_RING];
    size_t acap[ASYNC_RING];
    int anext;
};

static int mpi_fail(int rc, const char *call, int rank, char *err, size_t errlen)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS)
        len = 0;
    msg[len] = 0;
    return bn_err(err, errlen, BN_ECOMM, "rank %d: %s failed: %s", rank, call, len ? msg : "unknown error");
}

#define TRY(call, what) do { int rc_ = (call); if (rc_ != MPI_SUCCESS) \
    return mpi_fail(rc_, what, c->rank, err, errlen); } while (0)

int bn_comm_init(int *argc, char ***argv, bn_comm_t *c, char *err, size_t errlen)
{
    int provided = 0;
    memset(c, 0, sizeof *c);
    c->size = 1;
    c->node_ranks = 1;
    c->local_ranks = 1;
    int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Init_thread", -1, err, errlen);
    c->initialized = 1;
    c->rank = -1;
    TRY(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    TRY(MPI_Comm_rank(MPI_COMM_WORLD, &c->rank), "MPI_Comm_rank");
    TRY(MPI_Comm_size(MPI_COMM_WORLD, &c->size), "MPI_Comm_size");
    if (provided < MPI_THREAD_FUNNELED)
        return bn_err(err, errlen, BN_ECOMM, "rank %d: MPI provides thread level %d, FUNNELED needed",
                      c->rank, provided);
    /* ranks sharing this node; the plan uses the smallest count over the nodes */
    MPI_Comm node;
    TRY(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node),
        "MPI_Comm_split_type");
    int here = 1;
    rc = MPI_Comm_size(node, &here);
    c->local_ranks = here;
    MPI_Comm_free(&node);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Comm_size", c->rank, err, errlen);
    TRY(MPI_Allreduce(&here, &c->node_ranks, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
    return BN_OK;
}

void bn_comm_finalize(bn_comm_t *c)
{
    if (c->g) {
        for (int i = 0; i < STEP_RING; i++) {
            if (c->g->sreq[i] != MPI_REQUEST_NULL)
                MPI_Wait(&c->g->sreq[i], MPI_STATUS_IGNORE);
            free(c->g->sbuf[i]);
        }
        for (int i = 0; i < ASYNC_RING; i++) {
            if (c->g->areq[i] != MPI_REQUEST_NULL)
                MPI_Wait(&c->g->areq[i], MPI_STATUS_IGNORE);
            free(c->g->abuf[i]);
        }
        free(c->g->ring);
        if (c->g->replica_comm != MPI_COMM_NULL)
            MPI_Comm_free(&c->g->replica_comm);
        if (c->g->stage_comm != MPI_COMM_NULL)
            MPI_Comm_free(&c->g->stage_comm);
        free(c->g);
        c->g = NULL;
    }
    if (c->initialized)
        MPI_Finalize();
    c->initialized = 0;
}

void bn_comm_abort(bn_comm_t *c, int code)
{
    if (c->initialized)
        MPI_Abort(MPI_COMM_WORLD, code);
}

int bn_comm_grid(bn_comm_t *c, int R, int P, int T, char *err, size_t errlen)
{
    if (R < 1 || P < 1 || T < 1 || R * P * T != c->size)
        return bn_err(err, errlen, BN_EINVAL, "rank %d: grid %d x %d x %d does not match the world of %d ranks",
                      c->rank, R, P, T, c->size);
    bn_comm_grid_t *g = calloc(1, sizeof *g);
    if (!g)
        return bn_err(err, errlen, BN_ENOMEM, "rank %d: out of memory", c->rank);
    g->replica_comm = g->stage_comm = MPI_COMM_NULL;
    for (int i = 0; i < STEP_RING; i++)
        g->sreq[i] = MPI_REQUEST_NULL;
    for (int i = 0; i < ASYNC_RING; i++)
        g->areq[i] = MPI_REQUEST_NULL;
    c->g = g;
    g->c = c;
    g->R = R;
    g->P = P;
    g->T = T;
    g->tp = c->rank % T;
    g->stage = c->rank / T % P;
    g->replica = c->rank / (T * P);
    g->leader = g->replica * P * T;
    g->prev = g->stage > 0 ? c->rank - T : -1;
    g->next = g->stage + 1 < P ? c->rank + T : -1;
    if (c->size == 1)
        return BN_OK;
    TRY(MPI_Comm_split(MPI_COMM_WORLD, g->replica, c->rank, &g->replica_comm), "MPI_Comm_split");
    TRY(MPI_Comm_set_errhandler(g->replica_comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    TRY(MPI_Comm_split(MPI_COMM_WORLD, g->replica * P + g->stage, c->rank, &g->stage_comm), "MPI_Comm_split");
    TRY(MPI_Comm_set_errhandler(g->stage_comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    return BN_OK;
}

/* ---- the exchanges of the forward pass ---- */

/* chunk i of n floats split over T ranks */
static void chunk(size_t n, int T, int i, size_t *a, size_t *b)
{
    *a = n * (size_t)i / (size_t)T;
    *b = n * (size_t)(i + 1) / (size_t)T;
}

/* Ring allreduce in place: T-1 steps of reduce-scatter (chunk k is summed in the
 * order x_k + x_k+1 + ... around the ring), then T-1 steps passing the finished
 * chunks on, so every rank ends with the same bits. */
static int ring_allreduce(void *ctx, float *x, size_t n, char *err, size_t errlen)
{
    bn_comm_grid_t *g = ctx;
    bn_comm_t *c = g->c;
    const int T = g->T, me = g->tp, right = (me + 1) % T, left = (me + T - 1) % T;
    double t0 = bn_now_s();
    if (g->ring_cap < n / T + 1) {
        float *r = realloc(g->ring, (n / T + 1) * sizeof(float));
        if (!r)
            return bn_err(err, errlen, BN_ENOMEM, "rank %d: out of memory for an allreduce", c->rank);
        g->ring = r;
        g->ring_cap = n / T + 1;
    }
    float *tmp = g->ring;
    int rc = MPI_SUCCESS;
    for (int s = 0; s < T - 1 && rc == MPI_SUCCESS; s++) {
        size_t sa, sb, ra, rb;
        chunk(n, T, (me - s + 2 * T) % T, &sa, &sb);
        chunk(n, T, (me - s - 1 + 2 * T) % T, &ra, &rb);
        rc = MPI_Sendrecv(x + sa, (int)(sb - sa), MPI_FLOAT, right, TAG_RING, tmp, (int)(rb - ra), MPI_FLOAT, left,
                          TAG_RING, g->stage_comm, MPI_STATUS_IGNORE);
        for (size_t i = ra; i < rb && rc == MPI_SUCCESS; i++)
            x[i] = tmp[i - ra] + x[i];
        c->bytes_sent += (sb - sa) * sizeof(float);
    }
    for (int s = 0; s < T - 1 && rc == MPI_SUCCESS; s++) {
        size_t sa, sb, ra, rb;
        chunk(n, T, (me + 1 - s + 2 * T) % T, &sa, &sb);
        chunk(n, T, (me - s + 2 * T) % T, &ra, &rb);
        rc = MPI_Sendrecv(x + sa, (int)(sb - sa), MPI_FLOAT, right, TAG_RING, x + ra, (int)(rb - ra), MPI_FLOAT,
                          left, TAG_RING, g->stage_comm, MPI_STATUS_IGNORE);
        c->bytes_sent += (sb - sa) * sizeof(float);
    }
    c->collectives++;
    c->t_comm += bn_now_s() - t0;
    return rc == MPI_SUCCESS ? BN_OK : mpi_fail(rc, "MPI_Sendrecv (allreduce)", c->rank, err, errlen);
}

static int stage_allgather(void *ctx, const void *in, size_t bytes, void *out, char *err, size_t errlen)
{
    bn_comm_grid_t *g = ctx;
    bn_comm_t *c = g->c;
    double t0 = bn_now_s();
    int rc = MPI_Allgather(in, (int)bytes, MPI_BYTE, out, (int)bytes, MPI_BYTE, g->stage_comm);
    c->bytes_sent += (size_t)(g->T - 1) * bytes;
    c->collectives++;
    c->t_comm += bn_now_s() - t0;
    return rc == MPI_SUCCESS ? BN_OK : mpi_fail(rc, "MPI_Allgather", c->rank, err, errlen);
}

static int stage_recv_prev(void *ctx, float *x, size_t n, char *err, size_t errlen)
{
    bn_comm_grid_t *g = ctx;
    bn_comm_t *c = g->c;
    double t0 = bn_now_s();
    int rc = MPI_Recv(x, (int)n, MPI_FLOAT, g->prev, TAG_ACT, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    c->t_wait += bn_now_s() - t0; /* mostly the stage before computing */
    return rc == MPI_SUCCESS ? BN_OK : mpi_fail(rc, "MPI_Recv (activations)", c->rank, err, errlen);
}

static int stage_send_next(void *ctx, const float *x, size_t n, char *err, size_t errlen)
{
    bn_comm_grid_t *g = ctx;
    bn_comm_t *c = g->c;
    double t0 = bn_now_s();
    int rc = MPI_Send(x, (int)n, MPI_FLOAT, g->next, TAG_ACT, MPI_COMM_WORLD);
    c->bytes_sent += n * sizeof(float);
    c->messages++;
    c->t_comm += bn_now_s() - t0;
    return rc == MPI_SUCCESS ? BN_OK : mpi_fail(rc, "MPI_Send (activations)", c->rank, err, errlen);
}

void bn_comm_dist(bn_comm_t *c, bn_dist_t *d)
{
    *d = (bn_dist_t){ .tp = c->g ? c->g->T : 1, .ctx = c->g, .allreduce_sum = ring_allreduce,
                      .allgather = stage_allgather, .recv_prev = stage_recv_prev, .send_next = stage_send_next };
}

/* ---- steps ---- */

/* Wait for rq without burning a core: a short spin (a step usually follows
 * within microseconds while a job runs), then sleeps doubling up to 2 ms. */
static int idle_wait(bn_comm_t *c, MPI_Request *rq, const char *call, char *err, size_t errlen)
{
    double t0 = bn_now_s();
    long ns = 0;
    for (int i = 0;; i++) {
        int done = 0;
        int rc = MPI_Test(rq, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return mpi_fail(rc, call, c->rank, err, errlen);
        if (done)
            break;
        if (i < 200)
            continue;
        ns = ns ? ns * 2 : 20000;
        if (ns > 2000000)
            ns = 2000000;
        struct timespec ts = { 0, ns };
        nanosleep(&ts, NULL);
    }
    c->t_wait += bn_now_s() - t0;
    return BN_OK;
}

int bn_comm_step_send(bn_comm_t *c, int replica, void *buf, size_t len, char *err, size_t errlen)
{
    bn_comm_grid_t *g = c->g;
    if (c->size == 1)
        return BN_OK;
    double t0 = bn_now_s();
    if (replica == 0) {
        int i = g->snext;
        g->snext = (i + 1) % STEP_RING;
        if (g->sreq[i] != MPI_REQUEST_NULL) /* STEP_RING steps ago: long received */
            TRY(MPI_Wait(&g->sreq[i], MPI_STATUS_IGNORE), "MPI_Wait (step)");
        if (!g->sbuf[i] || g->scap < len) {
            for (int k = 0; k < STEP_RING; k++) { /* all the same size: the buffers are idle or waited */
                if (k != i && g->sreq[k] != MPI_REQUEST_NULL)
                    TRY(MPI_Wait(&g->sreq[k], MPI_STATUS_IGNORE), "MPI_Wait (step)");
                free(g->sbuf[k]);
                g->sbuf[k] = NULL;
            }
            for (int k = 0; k < STEP_RING; k++)
                if (!(g->sbuf[k] = malloc(len)))
                    return bn_err(err, errlen, BN_ENOMEM, "rank %d: out of memory", c->rank);
            g->scap = len;
        }
        memcpy(g->sbuf[i], buf, len);
        TRY(MPI_Ibcast(g->sbuf[i], (int)len, MPI_BYTE, 0, g->replica_comm, &g->sreq[i]), "MPI_Ibcast (step)");
        c->bytes_sent += len * (size_t)(g->P * g->T - 1);
    } else {
        TRY(MPI_Send(buf, (int)len, MPI_BYTE, replica * g->P * g->T, TAG_STEP, MPI_COMM_WORLD), "MPI_Send (step)");
        c->bytes_sent += len;
        c->messages++;
    }
    c->t_comm += bn_now_s() - t0;
    return BN_OK;
}

int bn_comm_step_recv(bn_comm_t *c, void *buf, size_t len, char *err, size_t errlen)
{
    bn_comm_grid_t *g = c->g;
    MPI_Request rq;
    if (c->rank == g->leader) { /* a replica other than rank 0's: the step comes from rank 0 */
        TRY(MPI_Irecv(buf, (int)len, MPI_BYTE, 0, TAG_STEP, MPI_COMM_WORLD, &rq), "MPI_Irecv (step)");
        int rc = idle_wait(c, &rq, "MPI_Test (step)", err, errlen);
        if (rc)
            return rc;
        if (g->P * g->T == 1)
            return BN_OK;
        TRY(MPI_Ibcast(buf, (int)len, MPI_BYTE, 0, g->replica_comm, &rq), "MPI_Ibcast (step)");
        TRY(MPI_Wait(&rq, MPI_STATUS_IGNORE), "MPI_Wait (step)");
        c->bytes_sent += len * (size_t)(g->P * g->T - 1);
        return BN_OK;
    }
    TRY(MPI_Ibcast(buf, (int)len, MPI_BYTE, 0, g->replica_comm, &rq), "MPI_Ibcast (step)");
    return idle_wait(c, &rq, "MPI_Test (step)", err, errlen);
}

int bn_comm_send(bn_comm_t *c, int to, int tag, const void *buf, size_t len, char *err, size_t errlen)
{
    double t0 = bn_now_s();
    TRY(MPI_Send(buf, (int)len, MPI_BYTE, to, 16 + tag, MPI_COMM_WORLD), "MPI_Send");
    c->bytes_sent += len;
    c->messages++;
    c->t_comm += bn_now_s() - t0;
    return BN_OK;
}

int bn_comm_send_async(bn_comm_t *c, int to, int tag, const void *buf, size_t len, char *err, size_t errlen)
{
    bn_comm_grid_t *g = c->g;
    double t0 = bn_now_s();
    int i = g->anext;
    g->anext = (i + 1) % ASYNC_RING;
    if (g->areq[i] != MPI_REQUEST_NULL) /* ASYNC_RING messages ago */
        TRY(MPI_Wait(&g->areq[i], MPI_STATUS_IGNORE), "MPI_Wait (result)");
    if (g->acap[i] < len || !g->abuf[i]) {
        void *nb = realloc(g->abuf[i], len ? len : 1);
        if (!nb)
            return bn_err(err, errlen, BN_ENOMEM, "rank %d: out of memory for a message of %zu bytes", c->rank, len);
        g->abuf[i] = nb;
        g->acap[i] = len;
    }
    if (len)
        memcpy(g->abuf[i], buf, len);
    TRY(MPI_Isend(g->abuf[i], (int)len, MPI_BYTE, to, 16 + tag, MPI_COMM_WORLD, &g->areq[i]), "MPI_Isend");
    c->bytes_sent += len;
    c->messages++;
    c->t_comm += bn_now_s() - t0;
    return BN_OK;
}

int bn_comm_probe(bn_comm_t *c, int from, int tag, int *ready, char *err, size_t errlen)
{
    *ready = 0;
    TRY(MPI_Iprobe(from, 16 + tag, MPI_COMM_WORLD, ready, MPI_STATUS_IGNORE), "MPI_Iprobe");
    return BN_OK;
}

int bn_comm_recv(bn_comm_t *c, int from, int tag, void *buf, size_t len, char *err, size_t errlen)
{
    double t0 = bn_now_s();
    TRY(MPI_Recv(buf, (int)len, MPI_BYTE, from, 16 + tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv");
    c->t_wait += bn_now_s() - t0;
    return BN_OK;
}

int bn_comm_gather(bn_comm_t *c, const void *in, size_t len, void *out, char *err, size_t errlen)
{
    if (c->size == 1) {
        memcpy(out, in, len);
        return BN_OK;
    }
    TRY(MPI_Gather(in, (int)len, MPI_BYTE, out, (int)len, MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Gather");
    return BN_OK;
}

int bn_comm_min_u64(bn_comm_t *c, uint64_t *v, char *err, size_t errlen)
{
    if (c->size == 1)
        return BN_OK;
    uint64_t in = *v;
    TRY(MPI_Allreduce(&in, v, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
    return BN_OK;
}
