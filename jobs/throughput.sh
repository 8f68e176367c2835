#!/usr/bin/env bash
# Throughput job: 1000 chat prompts of mixed lengths through the demo model, NP data-parallel replicas.
#   NP=2 bash jobs/throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/smollm2-135m-instruct}
N=${N:-1000}
NP=${NP:-1}
OUT=${OUT:-runs/throughput/results.jsonl}
mkdir -p "$(dirname "$OUT")"
[ -f "$MODEL/config.json" ] || mpiinfer convert-gguf "$MODEL"
mkdir -p runs/throughput
python jobs/make_prompts.py "$N" runs/throughput/prompts.jsonl
THREADS=$(( $(nproc) / NP )); [ "$THREADS" -ge 1 ] || THREADS=1
mpiexec -n "$NP" mpiinfer run -m "$MODEL" -i runs/throughput/prompts.jsonl -o "$OUT" --overwrite \
  --threads "$THREADS" --max-batch 32
python -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in ('records','errors','records_per_s','generated_tokens_per_s')})" "$OUT.summary.json"
