#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine for the tests and CI: munged, slurmctld and slurmd on
# localhost, started by hand (package scripts cannot start services here) with fast-requeue settings
# (credentials expire after 5 s, the scheduler runs every 2 s), so a requeued job restarts in seconds.
# Needs root and Debian's slurm-wlm + munge (`install` runs apt-get). State, logs and slurm.conf live in
# $LMM_SLURM_DIR (default /tmp/lmm-slurm); daemons are stopped by the PIDs in their pid files.
#
#   scripts/slurm/local_cluster.sh install   apt-get install slurm-wlm munge (if sinfo is missing)
#   scripts/slurm/local_cluster.sh start     write slurm.conf, start the daemons, wait until the node is idle
#   scripts/slurm/local_cluster.sh stop      stop the daemons this script started
#   scripts/slurm/local_cluster.sh status    sinfo
# After `start`, point clients at the cluster: export SLURM_CONF=$LMM_SLURM_DIR/slurm.conf
set -euo pipefail

DIR=${LMM_SLURM_DIR:-/tmp/lmm-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
    if command -v sinfo >/dev/null && command -v munged >/dev/null; then
        echo "slurm-wlm and munge already installed"
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
ClusterName=lmmlocal
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
KillWait=5
SchedulerParameters=sched_interval=2,bf_interval=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd and munged are started by hand)"
    command -v slurmctld >/dev/null || die "slurmctld not found; run '$0 install' first"
    if ! pid_alive "$DIR/slurmctld.pid"; then
        rm -rf "$DIR/state" "$DIR/spool"  # a fresh cluster: no jobs recovered from an earlier one
    fi
    write_conf
    # munge: the package made /etc/munge/munge.key; munged runs as the munge user.
    if [[ ! -f /etc/munge/munge.key ]]; then
        mungekey --create >/dev/null 2>&1 || die "no /etc/munge/munge.key and mungekey failed"
        chown munge:munge /etc/munge/munge.key
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    if ! pid_alive /run/munge/munged.pid; then
        runuser -u munge -- /usr/sbin/munged
        echo started >"$DIR/munged.ours"
    fi
    pid_alive "$DIR/slurmctld.pid" || slurmctld
    for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    pid_alive "$DIR/slurmd.pid" || slurmd -N localhost
    for _ in $(seq 150); do
        state=$(sinfo -h -o %t 2>/dev/null || true)
        [[ $state == idle* || $state == mix* || $state == alloc* ]] && break
        sleep 0.2
    done
    [[ ${state:-} == idle* || ${state:-} == mix* || ${state:-} == alloc* ]] ||
        die "node did not become idle (state '${state:-?}'); see $DIR/log/"
    echo "local SLURM cluster up (node $state); export SLURM_CONF=$CONF"
}

stop() {
    for name in slurmd slurmctld; do
        if pid_alive "$DIR/$name.pid"; then
            pid=$(cat "$DIR/$name.pid")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    if [[ -f $DIR/munged.ours ]] && pid_alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)"
        rm -f "$DIR/munged.ours"
    fi
    echo "local SLURM cluster stopped"
}

case ${1:-} in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) die "usage: $0 install|start|stop|status" ;;
esac
