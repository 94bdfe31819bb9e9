/* test_status.c - the status list gives every code a distinct name and message. */
#include "test.h"
#include "base/status.h"

#include <string.h>

BN_TEST(status_names)
{
    CHECK_STR_EQ(bn_status_name(BN_OK), "BN_OK");
    CHECK_STR_EQ(bn_status_name(BN_EFORMAT), "BN_EFORMAT");
    CHECK_STR_EQ(bn_status_name(12345), "BN_UNKNOWN");
    CHECK_STR_EQ(bn_status_msg(BN_ENOMEM), "out of memory");
    char buf[32];
    CHECK_EQ_INT(bn_err(buf, sizeof buf, BN_EINVAL, "bad %s", "flag"), BN_EINVAL);
    CHECK_STR_EQ(buf, "bad flag");
}
