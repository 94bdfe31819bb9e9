#!/bin/sh
# batch.sh - batch-job throughput (make bench runs it after serve.sh).
#
# On the 2B4T shape (I2_S weights, Q6_K embedding, from run.sh's models/bench/),
# one rank x 2 threads: `bitnet-client batch` against `bitnet-worker --serve`
# (--max-seqs 32) at --concurrency 1, 8 and 32, then the same job offline
# (`bitnet-worker --batch`, --max-seqs 32) for reference. The job: BATCH_LINES
# (48) lines, each its own 32-token prompt and 64 greedy tokens (--ignore-eos).
# Prompts/s and generated tokens/s are the clients' summary lines (answered
# lines and generated tokens over the job's wall time). Appends a table to
# bench/RESULTS.md.
set -eu
cd "$(dirname "$0")/.."

PP=32 TG=64 SEED=${BENCH_SEED:-1}
LINES=${BATCH_LINES:-48}
LEVELS=${BATCH_LEVELS:-1 8 32}
MODELDIR=models/bench
TMP=build/bench/batch
rm -rf "$TMP"
mkdir -p "$TMP" "$MODELDIR"

say() { echo "bench/batch: $*" >&2; }
die() { echo "bench/batch: error: $*" >&2; exit 1; }

sh tools/install-deps.sh
make --no-print-directory -j2 bin/bitnet-worker bin/bitnet-client bin/bitnet-mkmodel >"$TMP/make.log" 2>&1 ||
    { tail -n 20 "$TMP/make.log" >&2; die "make failed"; }

# the file run.sh writes (same name, same command)
M=$MODELDIR/2b4t-i2_s-q6_k-bitnet-seed$SEED.gguf
cmd="bin/bitnet-mkmodel --preset 2b4t --arch bitnet --wtype i2_s --embd-type q6_k --seed $SEED"
if [ ! -f "$M" ] || [ "$(cat "$M.cmd" 2>/dev/null)" != "$cmd" ]; then
    say "writing $M"
    $cmd -o "$M.tmp" >&2 && mv "$M.tmp" "$M" && echo "$cmd" >"$M.cmd"
fi

IN=$TMP/in.jsonl
i=0
while [ $i -lt "$LINES" ]; do
    echo "{\"id\": $i, \"tokens\": [$(seq -s, $((1000 + 40 * i)) $((1000 + 40 * i + PP - 1)))], \"max_tokens\": $TG, \"temperature\": 0}"
    i=$((i + 1))
done >"$IN"

# "prompts/s tokens/s seconds" from a summary line
rates() { sed -n 's/.* in \([0-9.]*\) s (\([0-9.]*\) prompts\/s, \([0-9.]*\) generated tokens\/s).*/\2 \3 \1/p'; }

log=$TMP/server.log
bin/bitnet-worker --model "$M" --serve --bind 'tcp://127.0.0.1:*' --threads 2 --ctx 512 --max-seqs 32 \
    --max-queue 64 2>"$log" &
LAUNCHER=$!
n=0
until grep -q "serving on" "$log" 2>/dev/null; do
    n=$((n + 1))
    [ $n -lt 1200 ] || die "server did not start (see $log)"
    kill -0 $LAUNCHER 2>/dev/null || die "server ended (see $log)"
    sleep 0.1
done
EP=$(sed -n 's/.*serving on \([^ ]*\) (pid \([0-9]*\)).*/\1/p' "$log" | head -n 1)
RANK0=$(sed -n 's/.*serving on \([^ ]*\) (pid \([0-9]*\)).*/\2/p' "$log" | head -n 1)
bin/bitnet-client --server "$EP" --tokens 1,2,3 -n 4 --temp 0 >/dev/null # pages the weights in

RES=$TMP/results.txt
: >"$RES"
for c in $LEVELS; do
    say "bitnet-client batch --concurrency $c ($LINES lines)"
    out=$TMP/out-$c.jsonl
    bin/bitnet-client --server "$EP" --ignore-eos batch "$IN" "$out" --concurrency "$c" 2>"$TMP/client-$c.err" ||
        { cat "$TMP/client-$c.err" >&2; die "bitnet-client batch failed"; }
    [ "$(grep -c '"finish_reason":"length"' "$out")" = "$LINES" ] || die "$out: not $LINES answers of $TG tokens"
    echo "client $c $(rates <"$TMP/client-$c.err")" | tee -a "$RES" >&2
done
kill -TERM "$RANK0"
wait $LAUNCHER || true

say "bitnet-worker --batch (offline, --max-seqs 32)"
bin/bitnet-worker --model "$M" --threads 2 --ctx 512 --max-seqs 32 --ignore-eos --batch "$IN" --out "$TMP/offline.jsonl" \
    2>"$TMP/offline.err" || { tail -n 5 "$TMP/offline.err" >&2; die "bitnet-worker --batch failed"; }
# its summary has tokens/s and seconds; prompts/s from the lines
sum=$(grep '^batch: ' "$TMP/offline.err")
sec=$(echo "$sum" | sed -n 's/.* in \([0-9.]*\) s (.*/\1/p')
tps=$(echo "$sum" | sed -n 's/.*(\([0-9.]*\) generated tokens\/s).*/\1/p')
echo "offline 32 $(echo "$LINES $sec" | awk '{ printf "%.2f", $1 / $2 }') $tps $sec" | tee -a "$RES" >&2

CPU=$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n 1)
{
    echo
    echo "## make bench, batch jobs: $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo
    echo "- machine: $CPU, $(nproc) CPUs; kernels: $(sed -n 's/.*info  kernels \([a-z0-9]*\).*/\1/p' "$log" | head -n 1)"
    echo "- command: \`sh bench/batch.sh\` (in \`make bench\`): $M, $LINES lines of $PP-token prompts and $TG greedy"
    echo "  tokens (--ignore-eos); \`bitnet-client batch --concurrency N\` against \`bitnet-worker --serve --threads 2"
    echo "  --max-seqs 32\`, then \`bitnet-worker --batch --threads 2 --max-seqs 32\` (no server)"
    echo
    echo "| how | concurrency | prompts/s | generated tok/s | vs concurrency 1 | wall s |"
    echo "| --- | --- | --- | --- | --- | --- |"
    awk '{ if (!one && $1 == "client") one = $4
           printf "| %s | %s | %.2f | %.1f | %.2fx | %.1f |\n", ($1 == "client" ? "bitnet-client batch" : "bitnet-worker --batch"),
                  $2, $3, $4, $4 / one, $5 }' "$RES"
} >>bench/RESULTS.md
say "appended to bench/RESULTS.md"
tail -n 8 bench/RESULTS.md >&2
