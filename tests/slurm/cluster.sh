#!/bin/sh
# cluster.sh - a single-node Slurm for the tests (Debian 12, root): munged,
# slurmctld and slurmd started by hand from a state folder, no systemd, no
# cgroups, no accounting; nothing written to /etc.
#
#   tests/slurm/cluster.sh start DIR   install the packages if missing, write
#                                      DIR/slurm.conf, start the daemons, wait
#                                      for the node; exit 77 when Slurm cannot
#                                      be installed or started here (a skip)
#   tests/slurm/cluster.sh stop DIR    cancel every job, stop every daemon
#                                      started from DIR
# The clients then need SLURM_CONF=DIR/slurm.conf. With WATCH_PID set, start
# also leaves a watcher (in its own session) that stops the cluster once that
# process is gone: a test killed at its timeout leaves no daemons behind.
#
# Facts behind the choices (Slurm 22.05 and munge 0.5 on Debian 12): PID 1 is
# not systemd, so the packages' services never start; Slurm 22.05 needs munge,
# whose socket folder must be world-executable; proctrack/linuxproc with
# task/none needs no cgroups; MpiDefault=pmix lets srun start Debian's Open MPI
# programs; more tasks than CPUs needs sbatch -O.
set -u
cmd=${1:?usage: cluster.sh start|stop DIR}
DIR=${2:?usage: cluster.sh start|stop DIR}
NODE=$(hostname -s)
PORT=${SLURM_TEST_PORT:-6817}
export SLURM_CONF="$DIR/slurm.conf"

say() { echo "cluster.sh: $*" >&2; }
skip() { say "skip: $*"; exit 77; }

pid_of() { # the live process of a pid file
    [ -s "$1" ] || return 1
    p=$(cat "$1")
    kill -0 "$p" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && echo "$p"
}

wait_gone() { # up to 10 s, then KILL
    i=0
    while kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; do
        i=$((i + 1))
        [ $i -eq 50 ] && kill -TERM "$1" 2>/dev/null
        [ $i -ge 100 ] && { kill -KILL "$1" 2>/dev/null; return 0; }
        sleep 0.1
    done
}

install() {
    missing=
    for b in munged slurmctld slurmd sbatch; do command -v $b >/dev/null 2>&1 || missing=1; done
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || skip "Slurm is not installed and installing it needs root"
    pk="slurmctld slurmd slurm-client munge libpmix2" # libpmix2: srun --mpi=pmix
    say "installing $pk (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends $pk >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends $pk >/dev/null 2>&1; } ||
        skip "apt-get could not install $pk"
}

configure() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge/key" "$DIR/munge/run" "$DIR/cgroup"
    chmod 755 "$DIR" "$DIR/munge" "$DIR/munge/run"
    chmod 700 "$DIR/munge/key"
    [ -s "$DIR/munge/key/munge.key" ] ||
        { head -c 1024 /dev/urandom > "$DIR/munge/key/munge.key" && chmod 600 "$DIR/munge/key/munge.key"; }
    # RealMemory above what slurmd measures would drain the node
    mem=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
    cat > "$DIR/slurm.conf" <<CONF
ClusterName=bntest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/run/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    # slurmd 22.05 starts its cgroup plugin even when no plugin uses it, and
    # fails where /sys/fs/cgroup is not mounted (a chroot); the v1 plugin
    # pointed at an empty folder of our own starts and is never used.
    cat > "$DIR/cgroup.conf" <<CONF
CgroupPlugin=cgroup/v1
CgroupMountpoint=$DIR/cgroup
CgroupAutomount=no
CONF
}

start() {
    install
    configure
    if ! pid_of "$DIR/munge/run/munged.pid" >/dev/null; then
        rm -f "$DIR/munge/run/munge.sock" "$DIR/munge/run/munge.sock.lock"
        munged --socket="$DIR/munge/run/munge.sock" --key-file="$DIR/munge/key/munge.key" \
            --pid-file="$DIR/munge/run/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/key/munged.seed" || skip "munged did not start (see $DIR/log/munged.log)"
    fi
    pid_of "$DIR/slurmctld.pid" >/dev/null || slurmctld -c -f "$SLURM_CONF" || skip "slurmctld did not start"
    pid_of "$DIR/slurmd.pid" >/dev/null || slurmd -f "$SLURM_CONF" || skip "slurmd did not start"
    i=0
    while [ $i -lt 300 ]; do
        st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1)
        case "$st" in
        idle|mixed|allocated)
            say "node $NODE is $st"
            if [ -n "${WATCH_PID:-}" ]; then
                setsid sh -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" stop "$3"' \
                    watch "$WATCH_PID" "$0" "$DIR" </dev/null >/dev/null 2>&1 &
            fi
            return 0 ;;
        drain*|down*|inval*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;;
        esac
        sleep 0.2
        i=$((i + 1))
    done
    say "node $NODE not ready after 60 s (state '${st:-none}'); the logs:"
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2
    stop
    exit 1
}

stop() {
    c=$(pid_of "$DIR/slurmctld.pid"); d=$(pid_of "$DIR/slurmd.pid"); m=$(pid_of "$DIR/munge/run/munged.pid")
    if [ -n "$c" ]; then # cancel the jobs first: slurmd's shutdown leaves running steps alone
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null
        i=0
        while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        scontrol shutdown >/dev/null 2>&1 || kill -TERM "$c" 2>/dev/null
        wait_gone "$c"
    fi
    [ -n "$d" ] && { kill -TERM "$d" 2>/dev/null; wait_gone "$d"; }
    for e in /proc/[0-9]*/environ; do # steps of this cluster left behind (no pgrep in minbase)
        p=${e#/proc/}; p=${p%/environ}
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = slurmstepd ] &&
            grep -qz "SLURM_CONF=$SLURM_CONF" "$e" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    [ -n "$m" ] && { kill -TERM "$m" 2>/dev/null; wait_gone "$m"; }
    rm -f "$DIR/slurmctld.pid" "$DIR/slurmd.pid"
    return 0
}

case "$cmd" in
start) start ;;
stop) stop ;;
*) say "usage: cluster.sh start|stop DIR"; exit 2 ;;
esac
