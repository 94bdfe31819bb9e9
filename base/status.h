/* status.h - the project's status codes, one list for C code and the wire.
 *
 * Every function that can fail returns bn_status_t: BN_OK (0) or a negative code.
 * The X-macro below is the only list; it gives each code its name and a short
 * message. Details (which file, which key) go into the caller's error buffer.
 * The numbers are stable: the wire schema (proto/) carries them to clients.
 * base/ is the bottom layer: every module may include it (kernels too); it
 * includes nothing of the project. */
#ifndef BN_STATUS_H
#define BN_STATUS_H

#include <stddef.h>

#define BN_STATUS_LIST(X)                                              \
    X(BN_OK,           0,  "ok")                                        \
    X(BN_EINVAL,      -1,  "invalid argument")                          \
    X(BN_ENOMEM,      -2,  "out of memory")                             \
    X(BN_EIO,         -3,  "input/output error")                        \
    X(BN_EFORMAT,     -4,  "malformed file")                            \
    X(BN_EUNSUPPORTED,-5,  "unsupported")                               \
    X(BN_ERANGE,      -6,  "value out of range")                        \
    X(BN_ENOTFOUND,   -7,  "not found")                                 \
    X(BN_ECONTEXT,    -8,  "context length exceeded")                   \
    X(BN_EBUSY,       -9,  "busy")                                      \
    X(BN_ECOMM,      -10,  "communication failure")                     \
    X(BN_EINTERNAL,  -11,  "internal error")                          \
    X(BN_EPROTO,     -12,  "malformed message")                         \
    X(BN_EDENIED,    -13,  "permission denied")                        \
    X(BN_ESTOPPING,  -14,  "shutting down")

typedef enum {
#define BN_X(name, val, msg) name = val,
    BN_STATUS_LIST(BN_X)
#undef BN_X
} bn_status_t;

/* Name of a status ("BN_EFORMAT"), or "BN_UNKNOWN". Thread safe. */
const char *bn_status_name(int status);
/* Short message of a status ("malformed file"). Thread safe. */
const char *bn_status_msg(int status);

/* Error buffer used by functions that can fail: filled with one line (no newline)
 * naming what was wrong. `err` may be NULL. Returns `status`, so callers can write
 * `return bn_err(err, errlen, BN_EFORMAT, "%s: bad magic", path);`. */
int bn_err(char *err, size_t errlen, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
