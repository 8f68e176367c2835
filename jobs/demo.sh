#!/usr/bin/env bash
# Demo job, on a fresh machine too: sets up .venv when it is missing (jobs/env.sh), converts the
# SmolLM2-135M-Instruct demo model once, answers data/demo_prompts.jsonl.
#   bash jobs/demo.sh                 # one process
#   NP=2 bash jobs/demo.sh            # under mpiexec -n 2 (tensor parallel, --tp 2)
set -euo pipefail
cd "$(dirname "$0")/.."
. jobs/env.sh
MODEL=${MODEL:-models/smollm2-135m-instruct}
OUT=${OUT:-runs/demo/results.jsonl}
NP=${NP:-1}
mkdir -p "$(dirname "$OUT")"
if [ ! -f "$MODEL/config.json" ]; then
  echo "converting the demo model into $MODEL"
  mpiinfer convert-gguf "$MODEL"
fi
if [ "$NP" -gt 1 ]; then
  mpiexec -n "$NP" mpiinfer run -m "$MODEL" -i data/demo_prompts.jsonl -o "$OUT" --tp "$NP" --overwrite
else
  mpiinfer run -m "$MODEL" -i data/demo_prompts.jsonl -o "$OUT" --overwrite
fi
python - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"[{r['id']}] ERROR {r['error']['type']}: {r['error']['message']}")
    else:
        print(f"[{r['id']}] ({r['finish_reason']}, {r['usage']['completion_tokens']} tokens) {r['text'].strip()}")
PY
