#!/usr/bin/env bash
# A single-node SLURM on this machine for the cluster tests (tests/test_slurm.py): installs Debian's slurmctld, slurmd,
# the client commands and munge where missing, writes /etc/slurm/slurm.conf (one node, partition `cpu`, every daemon
# bound to 127.0.0.1) and starts munged, slurmctld and slurmd. Needs root (CI runs as root). Idempotent: a second call
# with the daemons up and the same config does nothing. Every finished job is appended to $EPD_SLURM_JOBCOMP
# (jobcomp/filetxt), and `squeue` keeps finished jobs for an hour (MinJobAge), so the tests see each submitted job.
# Stop with scripts/slurm_stop.sh.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm_start.sh: run as root (installs packages, writes /etc/slurm)"; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(hostname -s)
logs=/var/log/slurm
mkdir -p "$logs" /var/spool/slurmctld /var/spool/slurmd /etc/slurm

# munge: the authentication every SLURM message carries (its socket is local; it opens no port)
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# the node as slurmd sees it (CPUs, sockets, cores); memory less 1 GiB for the system
read -r hw < <(slurmd -C | head -1)
hw=${hw#NodeName=* }
mem=$(awk '/MemTotal/ {print int($2 / 1024) - 1024}' /proc/meminfo)
hw=$(echo "$hw" | sed -E "s/RealMemory=[0-9]+/RealMemory=$mem/")

conf=$(cat <<EOF
# Written by epd's scripts/slurm_start.sh: a one-node test cluster, every daemon on 127.0.0.1.
ClusterName=epd
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=30
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
SrunPortRange=60001-60200
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$logs/jobcomp.log
SchedulerType=sched/backfill
# schedule every 5 s (default 60/30): the tests wait on short jobs
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MinJobAge=3600
KillWait=60
ReturnToService=2
SlurmdTimeout=120
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host $hw State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]; then
  printf '%s\n' "$conf" > /etc/slurm/slurm.conf.tmp && mv /etc/slurm/slurm.conf.tmp /etc/slurm/slurm.conf
  changed=1
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$changed" = 1 ] && running /run/slurmctld.pid; then  # a new config: restart both daemons on it
  kill "$(cat /run/slurmd.pid 2>/dev/null)" "$(cat /run/slurmctld.pid)" 2>/dev/null || true
  for _ in $(seq 100); do running /run/slurmctld.pid || running /run/slurmd.pid || break; sleep 0.1; done
fi
running /run/slurmctld.pid || slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.2; done
running /run/slurmd.pid || slurmd -N "$host"

# the node must come up idle: a node left DOWN/DRAIN from an earlier run is resumed
for _ in $(seq 150); do
  state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
  case "$state" in idle*|mixed*|allocated*) break ;; down*|drain*) scontrol update NodeName="$host" State=RESUME || true ;; esac
  sleep 0.2
done
case "$state" in
  idle*|mixed*|allocated*) ;;
  *) echo "slurm_start.sh: node $host is '$state' (see $logs/slurmctld.log and $logs/slurmd.log)"; exit 1 ;;
esac
# both daemons listen on the loopback address only (they bind to what $host resolves to: it must be 127.x)
for port in 6817 6818; do
  addrs=$(awk -v p="$(printf '%04X' "$port")" '$4 == "0A" { split($2, a, ":"); if (a[2] == p) print a[1] }' \
    /proc/net/tcp /proc/net/tcp6)
  for a in $addrs; do
    [ "${#a}" = 8 ] && [ "${a:6:2}" = 7F ] && continue
    echo "slurm_start.sh: port $port listens on $a, not 127.x: make $host resolve to 127.0.0.1 (/etc/hosts)"
    bash "$(dirname "$0")/slurm_stop.sh"; exit 1
  done
  [ -n "$addrs" ] || { echo "slurm_start.sh: nothing listens on port $port"; exit 1; }
done
echo "SLURM up: node $host ($state), partition cpu, daemons on 127.0.0.1, jobcomp $logs/jobcomp.log"
