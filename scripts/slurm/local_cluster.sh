#!/usr/bin/env bash
# A one-host Slurm cluster for trying (and testing) the sbatch recipes: munged, slurmctld and
# slurmd on localhost, everything (config, state, logs, sockets) in one folder.
#
#   scripts/slurm/local_cluster.sh start [DIR]   # prints `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm/local_cluster.sh stop  [DIR]
#
# DIR defaults to $MODALIGN_SLURM_DIR or /tmp/modalign-slurm. Needs Debian's slurm-wlm
# (`apt-get install -y slurm-wlm`, which brings munge) and root (SlurmdUser=root). No cgroups:
# ProctrackType=proctrack/linuxproc, TaskPlugin=task/none. One node, this host, with CPUS
# (default: nproc) CPUs; ports SLURM_PORT (default 16817) and SLURM_PORT+1.
set -euo pipefail

cmd=${1:-}
dir=${2:-${MODALIGN_SLURM_DIR:-/tmp/modalign-slurm}}
port=${SLURM_PORT:-16817}
cpus=${CPUS:-$(nproc)}
node=$(hostname -s)

need() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || {
            echo "local_cluster.sh: $tool not found; install Debian's slurm-wlm (apt-get install -y slurm-wlm)" >&2
            exit 3
        }
    done
}

start() {
    need munged slurmctld slurmd scontrol sinfo
    if [ "$(id -u)" != 0 ]; then
        echo "local_cluster.sh: run as root (the local slurmd runs jobs as SlurmdUser=root)" >&2
        exit 3
    fi
    mkdir -p "$dir"/{state,spool,munge}
    chmod 700 "$dir/munge"
    if [ ! -f "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --force --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=modalign-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 1 60); do  # up once the node takes jobs
        if sinfo -h -N -o "%T" 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "local_cluster.sh: the node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    sinfo -N -l >&2 || true
    stop
    exit 1
}

stop_pid() {  # stop_pid PIDFILE: SIGTERM the daemon, wait for it, SIGKILL if it stays
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
}

stop() {
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munge/munged.pid"
}

case "$cmd" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
