#!/bin/sh
# mpi.sh - `make bench`, second part: bitnet-worker over MPI ranks on the 2B4T shape.
#
# What it does: on the I2_S + Q6_K 2B4T-shaped file that bench/run.sh writes (written
# here too if missing), times decode with 1 rank x 2 threads and, in the same run,
# alternating, with 2 ranks x 1 thread as tensor ranks (mpirun -n 2 --tp 2; Open MPI
# binds each rank to its own core) and as pipeline stages (--pp 2). Reports the
# median generation speed of each and the ratio 2 ranks / 1 rank (aim: >= 0.85 for
# tensor ranks), and, from `--stats`, the bytes all ranks send per generated token
# against the layout's minimum (aim: <= 1.1x), the collectives per token and the
# split of each rank's time into compute, communication and waiting.
#
# The layout's minimum per generated token, T tensor ranks, L layers, width D:
#   allreduces  T * L * 2 * 2 (T-1)/T * 4D   (two per layer; a ring sends 2 (T-1)/T of
#                                             the vector per rank, the least possible)
#   sub-norms   T * L * 2 * (T-1) * 8        (two floats per rank per sub-norm, DESIGN.md)
#   sampling    (T-1) * 32                   (each other slice's statistics and best
#                                             candidate, greedy)
#   the step    16 * (T-1)                   (one entry to each other rank)
# What it is not: a test; nothing here passes or fails.
#
# Also the prompt's speed (BENCH_PP tokens, default 256, in steps of 64 that the
# stages of --pp 2 work on one behind the other).
# Knobs: BENCH_TG (64), BENCH_PP (256), BENCH_RUNS (3), BENCH_QUICK=1 (tg 8, 1 run), BENCH_SEED (1),
# BENCH_RESULTS (bench/RESULTS.md; empty: not appended).
set -eu
cd "$(dirname "$0")/.."

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then d_tg=8 d_runs=1; else d_tg=64 d_runs=3; fi
TG=${BENCH_TG:-$d_tg}
RUNS=${BENCH_RUNS:-$d_runs}
SEED=${BENCH_SEED:-1}
RESULTS=${BENCH_RESULTS-bench/RESULTS.md}
WORKER=bin/bitnet-worker
MODEL=models/bench/2b4t-i2_s-q6_k-bitnet-seed$SEED.gguf
N_LAYER=30 N_EMBD=2560
TMP=build/bench/mpi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

say() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }

sh tools/install-deps.sh >&2
make -j2 bin/bitnet-worker bin/bitnet-mkmodel >&2
mkdir -p models/bench "$TMP"
cmd="bin/bitnet-mkmodel --preset 2b4t --arch bitnet --wtype i2_s --embd-type q6_k --seed $SEED"
if [ ! -f "$MODEL" ] || [ "$(cat "$MODEL.cmd" 2>/dev/null)" != "$cmd" ]; then
    say "writing $MODEL"
    $cmd -o "$MODEL.tmp" >&2 || die "bitnet-mkmodel failed"
    mv "$MODEL.tmp" "$MODEL"
    echo "$cmd" >"$MODEL.cmd"
fi
TOKENS=$(seq 1000 1007 | paste -sd, -)
PP=${BENCH_PP:-256}
PTOKENS=$(seq 1000 $((999 + PP)) | paste -sd, -)
ARGS="--model $MODEL --tokens $TOKENS -n $TG --temp 0 --ignore-eos --stats --log-level warn"
PARGS="--model $MODEL --tokens $PTOKENS -n 2 --temp 0 --stats --log-level warn"

# one measurement: name, then the command's prefix and flags
measure() {
    name=$1
    shift
    say "$name"
    # shellcheck disable=SC2086
    "$@" $ARGS >"$TMP/out" 2>"$TMP/err" || { tail -n 20 "$TMP/err" >&2; die "failed: $*"; }
    line=$(grep '^stats:' "$TMP/err" | tail -n 1)
    [ -n "$line" ] || die "no stats line: $*"
    kv "$line" gen_tps >>"$TMP/$name.tps"
    echo "$line" >"$TMP/$name.line"
    grep '^rank [0-9]*:' "$TMP/err" >"$TMP/$name.ranks" || true
    # the prompt's speed: PP tokens in steps of 64, which the stages overlap
    # shellcheck disable=SC2086
    "$@" $PARGS >"$TMP/out" 2>"$TMP/err" || { tail -n 20 "$TMP/err" >&2; die "failed: $*"; }
    kv "$(grep '^stats:' "$TMP/err" | tail -n 1)" prompt_tps >>"$TMP/$name.pps"
}

rm -f "$TMP"/*.tps "$TMP"/*.pps
r=0
while [ $r -lt "$RUNS" ]; do
    r=$((r + 1))
    measure one "$WORKER" --threads 2
    measure tp mpirun -n 2 "$WORKER" --threads 1 --tp 2
    measure pp mpirun -n 2 "$WORKER" --threads 1 --pp 2
done

pone=$(median <"$TMP/one.pps")
ptp=$(median <"$TMP/tp.pps")
ppp=$(median <"$TMP/pp.pps")
one=$(median <"$TMP/one.tps")
tp=$(median <"$TMP/tp.tps")
pp=$(median <"$TMP/pp.tps")
bytes=$(kv "$(cat "$TMP/tp.line")" bytes_per_token)
coll=$(kv "$(cat "$TMP/tp.line")" collectives_per_token)
T=2
minimum=$(awk -v T=$T -v L=$N_LAYER -v D=$N_EMBD 'BEGIN { printf "%.0f", T*L*2*2*(T-1)/T*4*D + T*L*2*(T-1)*8 + (T-1)*32 + 16*(T-1) }')
CPU=$(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo | head -n 1)

{
    echo
    echo "## MPI ranks on one node, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Machine: $CPU, $(nproc) CPUs. Command: \`make bench\` (bench/mpi.sh), file $(basename "$MODEL"),"
    echo "$TG greedy tokens after an 8-token prompt, median of $RUNS alternating runs; Open MPI binds each of"
    echo "the 2 ranks to its own core."
    echo
    echo "| run | generation tok/s | vs 1 rank x 2 threads | prompt ($PP tokens) tok/s | vs 1 rank x 2 threads |"
    echo "| --- | --- | --- | --- | --- |"
    echo "| 1 rank x 2 threads | $one | 1.00 | $pone | 1.00 |"
    awk -v a="$tp" -v b="$one" -v c="$ptp" -v d="$pone" 'BEGIN { printf "| 2 ranks x 1 thread, --tp 2 | %s | %.2f (aim >= 0.85) | %s | %.2f |\n", a, a / b, c, c / d }'
    awk -v a="$pp" -v b="$one" -v c="$ppp" -v d="$pone" 'BEGIN { printf "| 2 ranks x 1 thread, --pp 2 | %s | %.2f (one sequence: the stages take turns) | %s | %.2f (steps of 64 overlap) |\n", a, a / b, c, c / d }'
    echo
    awk -v b="$bytes" -v m="$minimum" -v c="$coll" 'BEGIN { printf "--tp 2: %.0f bytes sent per generated token by all ranks, the layout'"'"'s minimum %.0f: %.3fx (aim <= 1.1x); %s collectives per token per rank.\n", b, m, b / m, c }'
    echo
    echo "Per rank (--tp 2, last run):"
    echo
    sed 's/^/    /' "$TMP/tp.ranks"
} >"$TMP/report.md"
cat "$TMP/report.md"
if [ -n "$RESULTS" ]; then
    cat "$TMP/report.md" >>"$RESULTS"
    say "appended to $RESULTS"
fi
