#!/usr/bin/env bash
# A real one-node Slurm cluster for the tests, all state under DIR: munged, slurmctld, slurmd as background
# processes (their PIDs in DIR/*.pid).  Needs root and Debian's slurm-wlm and munge.
#   bash tests/slurm/cluster.sh start DIR     prints SLURM_CONF=DIR/slurm.conf once the node is idle
#   bash tests/slurm/cluster.sh stop DIR
set -euo pipefail
cmd=$1 D=$(realpath -m "$2")
stop() {
  for p in slurmd slurmctld munged; do
    if [ -f "$D/$p.pid" ]; then kill "$(cat "$D/$p.pid")" 2>/dev/null || true; fi
  done
  sleep 1
  for p in slurmd slurmctld munged; do
    if [ -f "$D/$p.pid" ]; then kill -9 "$(cat "$D/$p.pid")" 2>/dev/null || true; rm -f "$D/$p.pid"; fi
  done
}
if [ "$cmd" = stop ]; then stop; exit 0; fi
mkdir -p "$D"/state "$D"/spool "$D"/munge "$D"/log
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
# munge: our own key and socket, so nothing of the host's is touched
dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$D/munge/munge.key"
munged --force --key-file="$D/munge/munge.key" --socket="$D/munge/socket" --pid-file="$D/munged.pid" \
  --log-file="$D/log/munged.log" --seed-file="$D/munge/seed"
cat > "$D/slurm.conf" <<CONF
ClusterName=mpiinfer-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$D/munge/socket
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldPort=${SLURM_TEST_PORT:-16817}
SlurmdPort=$(( ${SLURM_TEST_PORT:-16817} + 1 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
MinJobAge=600
KillWait=10
InactiveLimit=0
MessageTimeout=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF=$D/slurm.conf
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.2
done
echo "slurm did not come up: $(sinfo 2>&1 | tail -n 3)" >&2
tail -n 20 "$D/log/slurmctld.log" "$D/log/slurmd.log" >&2 || true
stop
exit 1
