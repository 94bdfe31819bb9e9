/* wire.h - proto/bitnet.proto's messages to and from plain C (coordinator/request.h).
 *
 * What it is: the one place that unpacks and validates a client's bytes. Every
 * field is checked against a limit before it is used or copied: a request that
 * does not unpack, has no or an unknown protocol version, no body, or a value out
 * of range is refused with a status and a message naming the field. Replies are
 * packed into malloc'd buffers.
 * What it is not: the socket (server.c) or the scheduler (sched.h).
 * Thread safe (no shared state). */
#ifndef BN_WIRE_H
#define BN_WIRE_H

#include "coordinator/request.h"
#include "coordinator/sched.h"

#include <stddef.h>
#include <stdint.h>

#define BN_PROTOCOL_VERSION 1
#define BN_WIRE_ID_MAX 128          /* bytes of a client's request id */
#define BN_WIRE_MAX_TOKENS (1 << 20) /* prompt ids in one request */

typedef enum { BN_MSG_GENERATE = 1, BN_MSG_CANCEL, BN_MSG_INFO, BN_MSG_HEALTH, BN_MSG_STATS } bn_msg_kind_t;

typedef struct {
    int kind;                   /* bn_msg_kind_t */
    char id[BN_WIRE_ID_MAX + 1]; /* the client's request id ("" when none), also after a failed decode */
    bn_gen_params_t gen;        /* BN_MSG_GENERATE */
} bn_wire_req_t;

/* Decode and validate one request frame. BN_OK, or BN_EPROTO (does not unpack,
 * no body), BN_EUNSUPPORTED (protocol version), BN_EINVAL / BN_ERANGE (a field),
 * with the message in err. The caller frees with bn_wire_req_free (also after a
 * failure). */
int bn_wire_decode(const void *buf, size_t len, bn_wire_req_t *out, char *err, size_t errlen);
void bn_wire_req_free(bn_wire_req_t *r);

/* What the server tells about itself (info). */
typedef struct {
    const char *model, *arch, *plan, *kernels, *lm_head, *kv_type;
    uint32_t n_layer, n_embd, n_vocab, n_ctx, ranks, replicas, stages, tensor_ranks, threads;
    uint32_t max_seqs, max_queue, max_tokens, max_message_bytes, step_tokens;
    uint64_t kv_budget_bytes;
} bn_wire_info_t;

/* Replies, packed into *buf (malloc'd, caller frees). BN_OK or BN_ENOMEM. */
int bn_wire_chunk(const char *id, uint32_t seq, const char *text, size_t len, const int32_t *ids, int n_ids,
                  uint8_t **buf, size_t *blen);
int bn_wire_final(const char *id, int finish, const bn_usage_t *u, const char *detail, uint8_t **buf, size_t *blen);
int bn_wire_error(const char *id, int status, const char *msg, uint8_t **buf, size_t *blen);
int bn_wire_info(const char *id, const bn_wire_info_t *in, uint8_t **buf, size_t *blen);
int bn_wire_health(const char *id, int ok, int draining, double uptime_s, uint32_t running, uint32_t queued,
                   uint8_t **buf, size_t *blen);
int bn_wire_stats(const char *id, const bn_sched_stats_t *st, double uptime_s, uint64_t bad_messages, uint64_t budget,
                  uint64_t kv_resident, uint8_t **buf, size_t *blen);

#endif
