#!/usr/bin/env bash
# Every GPU check in one run (at most 8 minutes on one GPU): one line per check, a summary table, JSON.
#   bash jobs/gpu_check.sh                     # on a GPU node: makes .venv-gpu, then runs jobs/gpu_check.py
#   bash jobs/gpu_check.sh --dry-run           # on CPU, in the project's .venv: the same logic, CUDA parts skipped
#   bash jobs/gpu_check.sh --only env,tp2_dda  # some checks; --out DIR: the report (default runs/gpu_check, or
#                                              # $OUT); --work DIR: scratch (default a new temp dir, removed when
#                                              # every check passed)
#   bash jobs/gpu_check.sh --fetch-wheels      # on a machine with pip access: download into .whl/ the wheels a GPU
#                                              # node without internet needs (Python 3.12, manylinux x86-64)
# The GPU environment is its own venv, never the CPU one (.venv):
#   MPIINFER_GPU_VENV=DIR    where (default .venv-gpu)
#   MPIINFER_GPU_PYTHON=PY   the python it is made from (default python3).  When that python already has a CUDA
#                            torch (a GPU image, a cluster module), the venv is made on top of it
#                            (--system-site-packages) and nothing large is installed; else pip installs
#                            torch==$MPIINFER_GPU_TORCH (default 2.13.0: PyPI's Linux build is a CUDA one) and
#                            $MPIINFER_GPU_CUPY (default cupy-cuda12x) from the package registries.
#   Wheels in .whl/ (or $MPIINFER_WHEELS) are installed from there without an index (air-gapped GPU nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${MPIINFER_WHEELS:-.whl}

if [ "${1:-}" = "--fetch-wheels" ]; then
  # what the project needs beyond a CUDA PyTorch image's packages: an MPI with mpiexec, mpi4py for it, gguf
  mkdir -p "$WHEELS"
  for spec in mpich mpi4py gguf; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$WHEELS" "$spec"
  done
  ls -la "$WHEELS"
  exit 0
fi

for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then
    . jobs/env.sh                     # the CPU venv, made when missing
    exec python jobs/gpu_check.py "$@"
  fi
done

VENV=${MPIINFER_GPU_VENV:-.venv-gpu}
if [ ! -f "$VENV/.mpiinfer-gpu-ready" ]; then
  BASE=${MPIINFER_GPU_PYTHON:-python3}
  OFFLINE=()
  [ -d "$WHEELS" ] && OFFLINE=(--no-index --find-links "$WHEELS")
  if "$BASE" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "gpu_check.sh: $VENV on top of $BASE (CUDA torch $("$BASE" -c 'import torch; print(torch.__version__)'))"
    "$BASE" -m venv --system-site-packages "$VENV"
    # when $BASE is itself a venv (the H200 image's python3 is /opt/torch/.venv), --system-site-packages reaches
    # only the interpreter's own packages, not that venv's: a .pth file adds its site-packages (and their .pth files) after ours
    SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$BASE" -c "import site; print('import site; ' + '; '.join(f'site.addsitedir({d!r})' for d in site.getsitepackages()))" \
      > "$SITE/_mpiinfer_gpu_base.pth"
  else
    echo "gpu_check.sh: $VENV with torch==${MPIINFER_GPU_TORCH:-2.13.0} and ${MPIINFER_GPU_CUPY:-cupy-cuda12x}"
    "$BASE" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "${OFFLINE[@]}" "torch==${MPIINFER_GPU_TORCH:-2.13.0}" \
      "${MPIINFER_GPU_CUPY:-cupy-cuda12x}"
  fi
  if [ -d "$WHEELS" ]; then
    "$VENV/bin/python" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
  fi
  # the project itself (editable, its missing dependencies from the wheels or the registries)
  if ! "$VENV/bin/python" -m pip install -q "${OFFLINE[@]}" -e ".[test]" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . \
      || echo "gpu_check.sh: mpiinfer not installed; the checks import it from this checkout (PYTHONPATH)"
  fi
  touch "$VENV/.mpiinfer-gpu-ready"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
exec python jobs/gpu_check.py "$@"
