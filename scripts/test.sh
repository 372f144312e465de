#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VPY=.venv/bin/python
"$VPY" -m ruff check micromoe tests benchmarks examples
"$VPY" -m ruff format --check micromoe tests benchmarks examples
set +e
"$VPY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit "$rc"
