/* status.c - names and messages for base/status.h, and the error-buffer helper. */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>

const char *bn_status_name(int status)
{
    switch (status) {
#define BN_X(name, val, msg) case val: return #name;
    BN_STATUS_LIST(BN_X)
#undef BN_X
    }
    return "BN_UNKNOWN";
}

const char *bn_status_msg(int status)
{
    switch (status) {
#define BN_X(name, val, msg) case val: return msg;
    BN_STATUS_LIST(BN_X)
#undef BN_X
    }
    return "unknown status";
}

int bn_err(char *err, size_t errlen, int status, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return status;
}
