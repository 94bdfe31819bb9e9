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
    X(formats_same_logits) \
    X(shapes_vs_naive) \
    X(sampler_filters) \
    X(sampler_bad_params) \
    X(cli_tokenize_golden) \
    X(cli_dump_logits_golden) \
    X(cli_generate_golden) \
    X(cli_sampling) \
    X(cli_stops) \
    X(cli_stats_line) \
    X(cli_bad_input)
