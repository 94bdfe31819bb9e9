/* list.h - the one list of tests, in the order they run. Add a line per test. */
#define BN_TEST_LIST(X) \
    X(status_names)
