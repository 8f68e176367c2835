#!/usr/bin/env bash
# Long-document job: every .txt/.md file of DOCS is one request, wrapped by a summarisation prompt; with NP > 1
# each document of at least CP_MIN tokens is split over the NP ranks (context parallelism, ring attention).
#   DOCS=path/to/docs NP=2 bash jobs/long_docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/smollm2-135m-instruct}
NP=${NP:-1}
OUT=${OUT:-runs/long_docs/summaries.jsonl}
mkdir -p "$(dirname "$OUT")"
[ -f "$MODEL/config.json" ] || mpiinfer convert-gguf "$MODEL"
if [ -z "${DOCS:-}" ]; then
  DOCS=runs/long_docs/docs
  mkdir -p "$DOCS"
  for f in README.md data/README.md benchmarks/README.md; do cp "$f" "$DOCS/$(echo "$f" | tr / _)"; done
fi
mpiexec -n "$NP" mpiinfer run -m "$MODEL" -i "$DOCS" -o "$OUT" --overwrite --max-tokens 128 \
  --cp "$NP" --cp-min-tokens "${CP_MIN:-1024}" \
  --prompt-template 'Summarize the following document in three sentences.\n\n{document}'
python - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"== {r['id']}: " + (r["text"].strip() if "error" not in r else "ERROR " + r["error"]["message"]))
PY
