"""``mpiinfer slurm``: render an sbatch script for a job, one node or many.

Owns: the batch script that users submit, and the checks of what it is rendered from (options ``mpiinfer run``
knows, a grace period shorter than the time limit).  The script runs ``srun ... mpiinfer run`` as one job step
in the background; ``--signal=B:USR1@GRACE`` makes Slurm warn the batch shell GRACE seconds before the time
limit; the trap signals the step through Slurm (``scancel --signal=TERM``: a SIGTERM sent to ``srun`` itself
would make srun SIGKILL the tasks), the coordinator drains for half of GRACE (``MPIINFER_DRAIN_SECONDS``),
journals and exits 0, and the script re-submits its own text (``$0``, the copy Slurm runs: scripts submitted
through a pipe too) with the job's name, time limit, partition, account and directory, so the next
allocation resumes the output.  A job that finishes is never re-submitted; ``MPIINFER_MAX_RESUBMITS`` bounds
the chain.  ``--mpi``: the PMI plugin of the MPI library mpi4py loads (MPICH: pmi2, Open MPI: pmix).
"""
from __future__ import annotations

import re
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
signalled=0
on_usr1() {{
  signalled=1
  echo "mpiinfer: time limit near: stopping the job step cleanly"
  # through Slurm: SIGTERM to srun itself would make srun SIGKILL the tasks
  if [ -n "${{SLURM_JOB_ID:-}}" ] && command -v scancel >/dev/null; then
    scancel --signal=TERM "$SLURM_JOB_ID"
  else
    kill -TERM "$step" 2>/dev/null
  fi
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
    job=$(scontrol show job "${{SLURM_JOB_ID:-0}}" 2>/dev/null)
    limit=$(printf '%s\\n' "$job" | sed -n 's/.*TimeLimit=\\([^ ]*\\).*/\\1/p' | head -n 1)
    workdir=$(printf '%s\\n' "$job" | sed -n 's/^ *WorkDir=//p' | head -n 1)
    # the same script text ($0: the copy Slurm runs, also for a piped script) and the options sbatch was given
    MPIINFER_RESUBMITS=$((RESUBMITS + 1)) sbatch --export=ALL ${{SLURM_JOB_NAME:+--job-name="$SLURM_JOB_NAME"}} \\
      ${{limit:+--time="$limit"}} ${{SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"}} \\
      ${{SLURM_JOB_ACCOUNT:+--account="$SLURM_JOB_ACCOUNT"}} ${{workdir:+--chdir="$workdir"}} "$0"
  else
    echo "mpiinfer: not re-submitting: MPIINFER_MAX_RESUBMITS=$MAX_RESUBMITS reached; submit again to resume"
  fi
fi
exit "$rc"
"""

_VAR = re.compile(r"^\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)$")


def shell_word(arg: str) -> str:
    """``arg`` quoted for the script; a lone ``$VAR`` / ``${VAR}`` stays an expansion (``"$VAR"``)."""
    return f'"{arg}"' if _VAR.match(arg) else shlex.quote(arg)


def parse_time(text: str) -> int:
    """Seconds of a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r} is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH:MM:SS)")
    d, a, b, c = m.groups()
    if d is not None:            # D-HH[:MM[:SS]]
        return int(d) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:            # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:            # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60           # MM


def default_mpi_plugin() -> str:
    """srun's ``--mpi`` for the MPI library mpi4py loads: pmix for Open MPI, pmi2 otherwise (MPICH and its
    derivatives; the MPICH wheel aborts under pmix)."""
    try:
        import mpi4py
        mpi4py.rc.initialize = False
        from mpi4py import MPI
        version = MPI.Get_library_version()
    except Exception:  # no MPI here: render for the common case
        return "pmi2"
    return "pmix" if "Open MPI" in version else "pmi2"


def render(run_args: list, nodes: int = 1, tasks_per_node: int = 1, cpus_per_task: int = 1,
           gpus_per_node: int = 0, time: str = "04:00:00", grace: int = 300, job_name: str = "mpiinfer",
           log: str = "mpiinfer-%j.log", partition: str | None = None, account: str | None = None,
           mpi: str = "pmi2", max_resubmits: int = 20, mpiinfer: str = "mpiinfer", render_args: list = (),
           run_options: frozenset | None = None) -> str:
    """The sbatch script text. ``run_args``: the options of ``mpiinfer run`` (model, inputs, output, ...);
    ``run_options``: the option names ``mpiinfer run`` knows (unknown ones are refused)."""
    if run_options is not None:
        unknown = [a.split("=", 1)[0] for a in run_args
                   if a.startswith("-") and a != "-" and a.split("=", 1)[0] not in run_options]
        if unknown:
            raise ValueError(f"`mpiinfer run` has no option {', '.join(unknown)}")
    limit = parse_time(time)
    if grace >= limit:
        raise ValueError(f"--grace {grace} s is not shorter than the time limit --time {time} ({limit} s): the job "
                         "would be stopped before it starts")
    extra = ""
    if partition:
        extra += f"#SBATCH --partition={partition}\n"
    if account:
        extra += f"#SBATCH --account={account}\n"
    gpu_line = f"#SBATCH --gpus-per-node={gpus_per_node}\n" if gpus_per_node else ""
    # srun of Slurm 22.05+ does not inherit the job's --cpus-per-task: pass it on
    launcher = f"srun --mpi={mpi} --kill-on-bad-exit=1 --cpus-per-task=${{SLURM_CPUS_PER_TASK:-1}}"
    if gpus_per_node:
        launcher += " --gpus-per-task=1 --gpu-bind=none"
    return TEMPLATE.format(
        job_name=job_name, nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
        gpu_line=gpu_line, time=time, grace=grace, drain=grace // 2, log=log, extra_sbatch=extra, launcher=launcher,
        mpiinfer=mpiinfer, run_args=" ".join(shell_word(a) for a in run_args), max_resubmits=max_resubmits,
        render_args=" ".join(shell_word(a) for a in render_args))
