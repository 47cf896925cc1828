#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for tests and demos: slurmctld + slurmd + munge.
#
#   scripts/slurm-local.sh start    install slurm-wlm/munge when missing, start (or reuse) the cluster
#   scripts/slurm-local.sh stop     stop the daemons this script started
#   scripts/slurm-local.sh status   exit 0 when the cluster answers and its node is usable
#
# State (config, spool, logs, pid files) lives outside the clone in $LORAGEN_SLURM_DIR
# (default /var/tmp/loragen-slurm); /etc/slurm/slurm.conf is a symlink to its slurm.conf so
# sbatch/squeue/scontrol need no SLURM_CONF. The partition is `debug` (the default one).
# Tuned for tests: requeued jobs wait cred_expire (10 s) before they may start again, the
# scheduler runs every 2 s, and finished jobs stay visible to `scontrol show job` for an hour
# (there is no accounting database, so `sacct` does not work here).
set -euo pipefail

STATE="${LORAGEN_SLURM_DIR:-/var/tmp/loragen-slurm}"
CONF="$STATE/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
PARTITION=debug
NODE="$(hostname -s)"

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
  else die "needs root (or passwordless sudo) to run: $*"; fi
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  say "installing slurm-wlm and munge (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_ok && return
  as_root mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  as_root chown munge:munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then as_root mungekey --create --keyfile=/etc/munge/munge.key; fi
  as_root chown munge:munge /etc/munge/munge.key
  as_root chmod 600 /etc/munge/munge.key
  as_root rm -f /run/munge/munged.pid
  if [ "$(id -u)" -eq 0 ]; then runuser -u munge -- /usr/sbin/munged; else sudo -n -u munge /usr/sbin/munged; fi
  for _ in $(seq 50); do munge_ok && return; sleep 0.1; done
  die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  [ "$cpus" -lt 4 ] && cpus=4   # declared CPUs (config_overrides): room for a 2-task job next to another job
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  as_root mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
  as_root tee "$CONF" >/dev/null <<EOF
# Written by loragen's scripts/slurm-local.sh; regenerated on every clean start.
ClusterName=loragen
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
JobRequeue=1
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
  as_root mkdir -p /etc/slurm
  if [ -e "$ETC_CONF" ] && [ "$(readlink -f "$ETC_CONF")" != "$(readlink -f "$CONF")" ]; then
    die "$ETC_CONF exists and is not this script's; refusing to replace a real cluster's config"
  fi
  as_root ln -sfn "$CONF" "$ETC_CONF"
}

pid_of() { [ -s "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null && cat "$STATE/$1.pid"; }

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }

healthy() {
  [ -f "$CONF" ] && [ "$(readlink -f "$ETC_CONF" 2>/dev/null)" = "$(readlink -f "$CONF")" ] || return 1
  munge_ok && pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null || return 1
  case "$(node_state)" in idle* | mixed* | allocated* | completing*) return 0 ;; *) return 1 ;; esac
}

stop() {
  local name pid
  for name in slurmd slurmctld; do
    pid=$(pid_of "$name" || true)
    if [ -n "$pid" ]; then
      as_root kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && as_root kill -9 "$pid" 2>/dev/null || true
    fi
    as_root rm -f "$STATE/$name.pid"
  done
}

start() {
  install_if_missing
  start_munge
  if healthy; then
    say "reusing the running cluster (node $NODE: $(node_state)); state in $STATE"
    return
  fi
  local t0=$SECONDS
  stop
  as_root rm -rf "$STATE/ctld" "$STATE/spool"   # a clean start: no jobs left over from an earlier run
  write_conf
  as_root slurmctld -c -f "$CONF"   # -c: clear saved state
  as_root slurmd -f "$CONF"
  local st=""
  for _ in $(seq 150); do
    st=$(node_state)
    case "$st" in
      idle*) say "cluster up in $((SECONDS - t0)) s: node $NODE, partition $PARTITION; state in $STATE"; return ;;
      down* | drain*) as_root scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  die "node $NODE did not become idle (state: ${st:-none}); logs in $STATE/log"
}

status() {
  if healthy; then
    say "running: node $NODE $(node_state), partition $PARTITION; state in $STATE"
    sinfo
  else
    say "not running (state in $STATE)"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop; say "stopped" ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
