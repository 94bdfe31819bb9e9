/* list.h - the one list of tests, in the order they run. Add a line per test. */
#define BN_TEST_LIST(X) \
    X(status_names) \
    X(gguf_fixtures_open) \
    X(gguf_bad_fixtures) \
    X(gguf_hostile_headers) \
    X(bitlinear_golden) \
    X(logits_golden) \
    X(scale_tensor_applied) \
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
    X(cli_bad_input) \
    X(tokenizer_golden) \
    X(tokenizer_pretok) \
    X(tokenizer_bpe_rules) \
    X(tokenizer_bpe_vs_naive) \
    X(tokenizer_specials) \
    X(tokenizer_specials_vs_naive) \
    X(tokenizer_stream_utf8) \
    X(tokenizer_bad_input) \
    X(tokenizer_speed) \
    X(pack_roundtrip) \
    X(gguf_writer_roundtrip) \
    X(mkmodel_tiny_matches_fixture_layout) \
    X(mkmodel_vocab_valid) \
    X(mkmodel_same_seed_same_weights) \
    X(mkmodel_bad_flags)
