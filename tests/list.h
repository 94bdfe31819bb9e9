/* list.h - the one list of tests, in the order they run. Add a line per test. */
#define BN_TEST_LIST(X) \
    X(status_names) \
    X(gguf_fixtures_open) \
    X(gguf_bad_fixtures) \
    X(gguf_hostile_headers) \
    X(bitlinear_golden) \
    X(logits_golden) \
    X(greedy_golden) \
    X(forward_batch_contract) \
    X(formats_same_logits)
