#!/usr/bin/env bash
# The test suite, on a fresh machine too: sets up .venv when it is missing (jobs/env.sh), then runs pytest.
#   bash jobs/test.sh                  # everything: unit, mpi, cli and slow tiers
#   bash jobs/test.sh -m "not slow"    # the quick loop
#   bash jobs/test.sh tests/unit -x    # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
. jobs/env.sh
exec python -m pytest "$@"
