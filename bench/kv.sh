#!/bin/sh
# kv.sh - KV cache types at long context, and prefix reuse (make bench runs it
# after batch.sh).
#
# 1. bin/bitnet-kvbench (bench/kvbench.c) on the 2B4T shape (I2_S, Q6_K
#    embedding: run.sh's file) at 2 threads, contexts 1024 and 4096, and on
#    the two fixture models (contexts 1024 and 4000): per KV type, decode
#    tokens/s at 0, 1k and 4k, the share of a token's time in attention, the
#    sequence's resident KV memory, and against f32 KV the max and mean |logit
#    diff| and top-1 agreement over KV_STEPS (64) teacher-forced greedy steps.
# 2. Time to first token for requests sharing a 1000-token prefix, through
#    `bitnet-worker --serve` (2 threads) and `bitnet-client batch
#    --concurrency 1`: the prefix cache off (every request cold), then on (the
#    first cold, the others take the cached prefix over).
# Appends both tables to bench/RESULTS.md.
set -eu
cd "$(dirname "$0")/.."

SEED=${BENCH_SEED:-1}
STEPS=${KV_STEPS:-64}
MODELDIR=models/bench
TMP=build/bench/kv
rm -rf "$TMP"
mkdir -p "$TMP" "$MODELDIR"

say() { echo "bench/kv: $*" >&2; }
die() { echo "bench/kv: error: $*" >&2; exit 1; }

sh tools/install-deps.sh
make --no-print-directory -j2 bin/bitnet-worker bin/bitnet-client bin/bitnet-mkmodel bin/bitnet-kvbench \
    >"$TMP/make.log" 2>&1 || { tail -n 20 "$TMP/make.log" >&2; die "make failed"; }

M=$MODELDIR/2b4t-i2_s-q6_k-bitnet-seed$SEED.gguf
cmd="bin/bitnet-mkmodel --preset 2b4t --arch bitnet --wtype i2_s --embd-type q6_k --seed $SEED"
if [ ! -f "$M" ] || [ "$(cat "$M.cmd" 2>/dev/null)" != "$cmd" ]; then
    say "writing $M"
    $cmd -o "$M.tmp" >&2 && mv "$M.tmp" "$M" && echo "$cmd" >"$M.cmd"
fi

for f in tests/fixtures/tiny-b158-i2_s.gguf tests/fixtures/tiny-bitnet-tq2_0.gguf; do
    say "bitnet-kvbench $f"
    bin/bitnet-kvbench --model "$f" --threads 2 --ctx 1024,4000 --steps "$STEPS" >"$TMP/$(basename "$f").txt" ||
        die "bitnet-kvbench $f failed"
done
say "bitnet-kvbench $M (a few minutes: a 4096-token prompt per type)"
bin/bitnet-kvbench --model "$M" --threads 2 --ctx 1024,4096 --steps "$STEPS" >"$TMP/2b4t.txt" ||
    die "bitnet-kvbench $M failed"
cat "$TMP/2b4t.txt" >&2

# --- time to first token with a 1000-token shared prefix ---------------------
IN=$TMP/prefix.jsonl
PRE=$(seq -s, 2000 2999)
i=0
while [ $i -lt 6 ]; do
    echo "{\"id\": $i, \"tokens\": [$PRE,$(seq -s, $((5000 + 16 * i)) $((5000 + 16 * i + 15)))], \"max_tokens\": 4, \"temperature\": 0}"
    i=$((i + 1))
done >"$IN"
ttft() { # server flags -> one ttft per line (ms), in id order
    log=$TMP/server.log
    bin/bitnet-worker --model "$M" --serve --bind 'tcp://127.0.0.1:*' --threads 2 --ctx 2048 --max-seqs 4 "$@" \
        2>"$log" &
    pid=$!
    n=0
    until grep -q "serving on" "$log" 2>/dev/null; do
        n=$((n + 1))
        [ $n -lt 1200 ] || die "server did not start (see $log)"
        kill -0 $pid 2>/dev/null || die "server ended (see $log)"
        sleep 0.1
    done
    ep=$(sed -n 's/.*serving on \([^ ]*\) (pid \([0-9]*\)).*/\1/p' "$log" | head -n 1)
    rank0=$(sed -n 's/.*serving on \([^ ]*\) (pid \([0-9]*\)).*/\2/p' "$log" | head -n 1)
    bin/bitnet-client --server "$ep" --tokens 1,2,3 -n 2 --temp 0 >/dev/null # pages the weights in
    rm -f "$TMP/prefix.out"
    bin/bitnet-client --server "$ep" batch "$IN" "$TMP/prefix.out" --concurrency 1 2>"$TMP/client.err" ||
        { cat "$TMP/client.err" >&2; die "bitnet-client batch failed"; }
    kill -TERM "$rank0"
    wait $pid || true
    sed -n 's/.*"id":\([0-9]*\),.*"time_to_first_token_ms":\([0-9.]*\).*/\1 \2/p' "$TMP/prefix.out" | sort -n |
        awk '{ printf "%s ", $2 }'
}
say "time to first token, prefix cache off"
COLD=$(ttft --prefix-cache-mb 0)
say "time to first token, prefix cache on"
WARM=$(ttft)
say "off: $COLD; on: $WARM"

CPU=$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n 1)
{
    echo
    echo "## make bench, KV cache types and prefix reuse: $(date -u '+%Y-%m-%d %H:%M') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "- machine: $CPU, $(nproc) CPUs; kernels: $(sed -n 's/.*info  kernels \([a-z0-9]*\).*/\1/p' "$TMP/server.log" | head -n 1)"
    echo "- command: \`sh bench/kv.sh\` (in \`make bench\`): \`bin/bitnet-kvbench --threads 2 --steps $STEPS\` (bench/kvbench.c):"
    echo "  one sequence per KV type; decode speed at context 0, then after a prompt of 1024 and of 4096 (4000 for the"
    echo "  fixtures) deterministic ids, $STEPS decode steps fed f32's greedy tokens, their logits against f32's"
    echo "- tok/s: decode tokens/s; att: share of a token's time in attention; KV MB: the sequence's resident KV pages"
    echo
    for f in 2b4t tiny-b158-i2_s.gguf tiny-bitnet-tq2_0.gguf; do
        echo "$f:"
        echo
        echo "| KV | ctx | tok/s | vs ctx 0 | att | KV MB | max abs logit diff | mean abs diff | top-1 agree |"
        echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        awk '{ for (i = 1; i <= NF; i++) { split($i, a, "="); v[a[1]] = a[2] }
               if (v["ctx"] == 0) base[v["kv"]] = v["tps"]
               printf "| %s | %s | %.2f | %.2fx | %.0f%% | %.1f | %s | %s | %s |\n", v["kv"], v["ctx"], v["tps"],
                      v["tps"] / base[v["kv"]], 100 * v["att"], v["kv_mb"],
                      ("max" in v) ? v["max"] : "-", ("mean" in v) ? v["mean"] : "-", ("top1" in v) ? v["top1"] : "-"
               delete v }' "$TMP/$f.txt"
        echo
    done
    echo "Time to first token (ms) of 6 requests in turn (\`bitnet-client batch --concurrency 1\`), each a 1000-token"
    echo "shared prefix and 16 tokens of its own, 2b4t shape, \`bitnet-worker --serve --threads 2 --max-seqs 4\`:"
    echo
    echo "| prefix cache | request 1 | 2 | 3 | 4 | 5 | 6 |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    echo "| off (--prefix-cache-mb 0) | $(echo $COLD | sed 's/ / | /g') |"
    echo "| on (default) | $(echo $WARM | sed 's/ / | /g') |"
} >>bench/RESULTS.md
say "appended to bench/RESULTS.md"
