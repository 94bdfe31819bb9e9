#!/bin/sh
# serve.sh - the service under load (make bench runs it after run.sh and mpi.sh).
#
# What it measures, on the 2B4T shape (I2_S weights, Q6_K embedding, from run.sh's
# models/bench/), 2 threads in all: `bitnet-worker --serve` on one rank x 2 threads
# and on `mpirun -n 2` x 1 thread, with 1, 4 and 16 bitnet-client processes started
# at once, each with its own 32-token prompt and 64 greedy tokens (--ignore-eos):
# aggregate generated tokens/s (all streams' tokens over the wall time from the
# first client's start to the last one's end), time to first token (p50/p99 over
# the clients' usage lines) and inter-token latency (p50/p99, the server's stats).
# Then llama.cpp's own server-style batching on the TQ2_0 file of the same weights:
# bench/llama_driver.c --streams N (N sequences of one context, decoded together),
# same prompt length, tokens and threads. Each level is its own server (fresh
# latency counters). Appends a table to bench/RESULTS.md.
# Aims (issue 11): 16 streams >= 4x the tokens/s of one stream, and p99
# inter-token latency with 16 streams <= 3x one stream's.
set -eu
cd "$(dirname "$0")/.."

PP=32 TG=64 SEED=${BENCH_SEED:-1}
LEVELS=${SERVE_LEVELS:-1 4 16}
MODELDIR=models/bench PEER=bench/.peer
TMP=build/bench/serve
rm -rf "$TMP"
mkdir -p "$TMP" "$MODELDIR"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

say() { echo "bench/serve: $*" >&2; }
die() { echo "bench/serve: error: $*" >&2; exit 1; }
kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
pct() { sort -g | awk -v p="$1" '{ a[NR] = $1 } END { if (!NR) { print 0; exit } i = int((NR - 1) * p + 1.5); if (i > NR) i = NR; print a[i] }'; }

sh tools/install-deps.sh
make --no-print-directory -j2 bin/bitnet-worker bin/bitnet-client bin/bitnet-mkmodel >"$TMP/make.log" 2>&1 ||
    { tail -n 20 "$TMP/make.log" >&2; die "make failed"; }

# the same files run.sh writes (same names, same commands)
model() {
    f=$MODELDIR/2b4t-$1-$2-bitnet-seed$SEED.gguf
    cmd="bin/bitnet-mkmodel --preset 2b4t --arch bitnet --wtype $1 --embd-type $2 --seed $SEED"
    if [ ! -f "$f" ] || [ "$(cat "$f.cmd" 2>/dev/null)" != "$cmd" ]; then
        say "writing $f"
        $cmd -o "$f.tmp" >&2 && mv "$f.tmp" "$f" && echo "$cmd" >"$f.cmd"
    fi
    echo "$f"
}
M=$(model i2_s q6_k)
ML=$(model tq2_0 q6_k)

# start a server: $1 = "1" (one rank, 2 threads) or "2" (mpirun -n 2, 1 thread each)
start() {
    log=$TMP/server-$1-$2.log
    if [ "$1" = 1 ]; then
        bin/bitnet-worker --model "$M" --serve --bind 'tcp://127.0.0.1:*' --threads 2 --ctx 512 --max-seqs 16 \
            2>"$log" &
    else
        mpirun -n 2 --bind-to none --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \
            bin/bitnet-worker --model "$M" --serve --bind 'tcp://127.0.0.1:*' --threads 1 --ctx 512 --max-seqs 16 \
            2>"$log" &
    fi
    LAUNCHER=$!
    i=0
    until grep -q "serving on" "$log" 2>/dev/null; do
        i=$((i + 1))
        [ $i -lt 1200 ] || die "server did not start (see $log)"
        kill -0 $LAUNCHER 2>/dev/null || die "server ended (see $log)"
        sleep 0.1
    done
    EP=$(sed -n 's/.*serving on \([^ ]*\) (pid \([0-9]*\)).*/\1/p' "$log" | head -n 1)
    RANK0=$(sed -n 's/.*serving on \([^ ]*\) (pid \([0-9]*\)).*/\2/p' "$log" | head -n 1)
    PLAN=$(bin/bitnet-client --server "$EP" info | sed -n 's/^ranks: //p')
}
stop() {
    kill -TERM "$RANK0"
    wait $LAUNCHER || true
}

# one level: $1 ranks, $2 streams; prints "tps ttft50 ttft99 itl50 itl99"
level() {
    start "$1" "$2"
    # one warm-up request pages the weights in
    bin/bitnet-client --server "$EP" --tokens 1,2,3 -n 4 --temp 0 >/dev/null
    stop
    start "$1" "$2"
    t0=$(date +%s.%N)
    s=0 pids=
    while [ $s -lt "$2" ]; do
        ids=$(seq -s, $((1000 + 40 * s)) $((1000 + 40 * s + PP - 1)))
        bin/bitnet-client --server "$EP" --tokens "$ids" -n $TG --temp 0 --ignore-eos --usage \
            >/dev/null 2>"$TMP/c-$1-$2-$s.err" &
        pids="$pids $!"
        s=$((s + 1))
    done
    wait $pids
    t1=$(date +%s.%N)
    stats=$(bin/bitnet-client --server "$EP" stats)
    stop
    gen=$(cat "$TMP"/c-"$1"-"$2"-*.err | sed -n 's/.*completion_tokens=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s }')
    [ "$gen" = $(($2 * TG)) ] || die "$2 streams generated $gen tokens, not $(($2 * TG)) (see $TMP)"
    ttft=$(cat "$TMP"/c-"$1"-"$2"-*.err | sed -n 's/.*ttft_ms=\([0-9.]*\).*/\1/p')
    echo "$(echo "$gen $t0 $t1" | awk '{ printf "%.2f", $1 / ($3 - $2) }') $(echo "$ttft" | pct 0.5) \
$(echo "$ttft" | pct 0.99) $(echo "$stats" | sed -n 's/^itl_p50_ms: //p') $(echo "$stats" | sed -n 's/^itl_p99_ms: //p')"
}

RES=$TMP/results.txt
: >"$RES"
for ranks in 1 2; do
    for n in $LEVELS; do
        say "bitnet-worker --serve, $ranks rank(s), $n streams"
        echo "ours $ranks $n $(level $ranks "$n")" | tee -a "$RES" >&2
    done
done

LLAMA_OK=0
if [ -x "$PEER/llama-driver" ]; then
    LIBDIR=$(cd "$PEER/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64" 2>/dev/null && pwd) || LIBDIR=
    for n in $LEVELS; do
        say "llama.cpp, $n sequences of one context"
        l=$("$PEER/llama-driver" --model "$ML" ${LIBDIR:+--libdir "$LIBDIR"} --threads 2 --pp $PP --tg $TG \
            --streams "$n" --runs 1 --first-token 1000 2>>"$TMP/llama.err" | grep '^llama: streams=') ||
            { say "llama.cpp failed (see $TMP/llama.err)"; break; }
        echo "llama 1 $n $(kv "$l" agg_tps) $(kv "$l" ttft_ms) $(kv "$l" ttft_ms) $(kv "$l" itl_p50_ms) $(kv "$l" itl_p99_ms)" |
            tee -a "$RES" >&2
        LLAMA_OK=1
    done
else
    say "no llama.cpp peer ($PEER/llama-driver): run make bench (run.sh builds it) for the comparison"
fi

# ---- report ---------------------------------------------------------------------------------
CPU=$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n 1)
{
    echo
    echo "## make bench, service under load: $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo
    echo "- machine: $CPU, $(nproc) CPUs; kernels: $(sed -n 's/.*info  kernels \([a-z0-9]*\).*/\1/p' "$TMP"/server-1-1.log | head -n 1)"
    echo "- command: \`sh bench/serve.sh\` (in \`make bench\`): $M, $PP-token prompts, $TG greedy tokens each"
    echo "  (--ignore-eos), N bitnet-client processes started at once; server --ctx 512 --max-seqs 16"
    echo "- llama.cpp: bench/llama_driver.c --streams N on the TQ2_0 file of the same weights (N sequences"
    echo "  of one context, prefilled, then decoded one token each per batch), 2 threads"
    echo
    echo "| engine | ranks x threads | streams | gen tok/s (all) | vs 1 stream | TTFT p50 / p99 ms | ITL p50 / p99 ms |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    awk '{
        key = $1 " " $2
        if (!(key in one)) one[key] = $4
        eng = "llama.cpp batched"; rt = "1 x 2"
        if ($1 == "ours") { eng = "bitnet-worker --serve"; if ($2 == 2) rt = "2 x 1" }
        printf "| %s | %s | %s | %.1f | %.2fx | %.0f / %.0f | %.1f / %.1f |\n", eng, rt, $3, $4, $4 / one[key], $5, $6, $7, $8
    }' "$RES"
    echo
    awk '$1 == "ours" { if (!(($2) in t1)) { t1[$2] = $4; i1[$2] = $8 } if ($3 == 16) { t16[$2] = $4; i16[$2] = $8 } }
        END { for (r in t16) printf "- aims, %s rank(s): 16 streams %.2fx one stream (aim >= 4x): %s; p99 ITL %.2fx (aim <= 3x): %s\n",
                 r, t16[r] / t1[r], ((t16[r] / t1[r] >= 4) ? "met" : "NOT met"), i16[r] / i1[r], ((i16[r] / i1[r] <= 3) ? "met" : "NOT met") }' "$RES"
    if [ $LLAMA_OK = 1 ]; then
        awk '$3 == 16 { v[$1 " " $2] = $4 } END { if (("ours 1") in v && ("llama 1") in v)
             printf "- 16 streams, same 2 threads: bitnet-worker %.2fx llama.cpp batched\n", v["ours 1"] / v["llama 1"] }' "$RES"
    fi
} >>bench/RESULTS.md
say "appended to bench/RESULTS.md"
tail -n 14 bench/RESULTS.md >&2
