"""``mpiinfer slurm``: render an sbatch script for a job, one node or many.

Owns: the batch script that users submit.  It runs ``srun ... mpiinfer run`` as one job step in the
background; ``--signal=B:USR1@GRACE`` makes Slurm warn the batch shell GRACE seconds before the time limit,
the trap sends SIGTERM to the step (the coordinator stops dispatching, flushes and exits 0), and the script
re-submits itself with the same arguments so the next allocation resumes the output.  A job that finishes is
never re-submitted; ``MPIINFER_MAX_RESUBMITS`` bounds the chain.
"""
from __future__ import annotations

import shlex

TEMPLATE = """#!/bin/bash
# Rendered by: mpiinfer slurm {render_args}
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
{gpu_line}#SBATCH --time={time}
#SBATCH --signal=B:USR1@{grace}
#SBATCH --output={log}
{extra_sbatch}set -uo pipefail

export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
# after the warning, running sequences may finish for half of the grace period (mpiinfer run --drain-seconds)
export MPIINFER_DRAIN_SECONDS=${{MPIINFER_DRAIN_SECONDS:-{drain}}}
RESUBMITS=${{MPIINFER_RESUBMITS:-0}}
MAX_RESUBMITS=${{MPIINFER_MAX_RESUBMITS:-{max_resubmits}}}
SCRIPT=$(scontrol show job "${{SLURM_JOB_ID:-0}}" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)
SCRIPT=${{SCRIPT:-$0}}
signalled=0
on_usr1() {{
  signalled=1
  echo "mpiinfer: time limit near: stopping the job step cleanly"
  kill -TERM "$step" 2>/dev/null
}}
trap on_usr1 USR1

{launcher} {mpiinfer} run {run_args} &
step=$!
while true; do
  wait "$step"; rc=$?
  # wait returns early (rc > 128) when the trap ran; keep waiting until the step has really exited
  if kill -0 "$step" 2>/dev/null; then continue; fi
  break
done

if [ "$signalled" = 1 ] && [ "$rc" = 0 ]; then
  if [ "$RESUBMITS" -lt "$MAX_RESUBMITS" ]; then
    echo "mpiinfer: re-submitting to resume ($((RESUBMITS + 1))/$MAX_RESUBMITS)"
    MPIINFER_RESUBMITS=$((RESUBMITS + 1)) sbatch --export=ALL "$SCRIPT"
  else
    echo "mpiinfer: not re-submitting: MPIINFER_MAX_RESUBMITS=$MAX_RESUBMITS reached; submit again to resume"
  fi
fi
exit "$rc"
"""


def render(run_args: list, nodes: int = 1, tasks_per_node: int = 1, cpus_per_task: int = 1,
           gpus_per_node: int = 0, time: str = "04:00:00", grace: int = 300, job_name: str = "mpiinfer",
           log: str = "mpiinfer-%j.log", partition: str | None = None, account: str | None = None,
           mpi: str = "pmix", max_resubmits: int = 20, mpiinfer: str = "mpiinfer", render_args: list = ()) -> str:
    """The sbatch script text. ``run_args``: the options of ``mpiinfer run`` (model, inputs, output, ...)."""
    extra = ""
    if partition:
        extra += f"#SBATCH --partition={partition}\n"
    if account:
        extra += f"#SBATCH --account={account}\n"
    gpu_line = f"#SBATCH --gpus-per-node={gpus_per_node}\n" if gpus_per_node else ""
    launcher = f"srun --mpi={mpi} --kill-on-bad-exit=1"
    if gpus_per_node:
        launcher += " --gpus-per-task=1 --gpu-bind=none"
    return TEMPLATE.format(
        job_name=job_name, nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
        gpu_line=gpu_line, time=time, grace=grace, drain=grace // 2, log=log, extra_sbatch=extra, launcher=launcher,
        mpiinfer=mpiinfer, run_args=" ".join(shlex.quote(a) for a in run_args), max_resubmits=max_resubmits,
        render_args=" ".join(shlex.quote(a) for a in render_args))
