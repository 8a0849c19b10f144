#!/usr/bin/env bash
# Stop the one-node SLURM that scripts/slurm_start.sh started (slurmd, slurmctld, munged), each by its pid file.
# Jobs still queued or running are cancelled first. The packages and /etc/slurm/slurm.conf stay.
set -uo pipefail
command -v scancel >/dev/null && scontrol ping 2>/dev/null | grep -q "is UP" && scancel --full --user="$(id -un)" 2>/dev/null
stop() {  # pid file
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "slurm_stop.sh: pid $pid ($1) still running"
}
stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/munge/munged.pid
echo "SLURM stopped"
