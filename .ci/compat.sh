#!/usr/bin/env bash
# Compatibility smoke (docs/compat.md), run by .ci/run after the main suite passed in .venv:
# the oldest supported transformers (pyproject's floor) and the newest the index serves, each installed
# into its own `pip install --target` folder (never .venv), then routing capture exact on the nine
# families, ban/force steering, expert statistics, the family-contract tests and
# `workbench demo --quick --no-serve`. Rewrites docs/compat_table.md and benchmarks/results/compat.json,
# and constraints.txt from .venv when everything passed. Exits non-zero when a version fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
python tools/compat.py --constraints "$@"
echo "compat: $(( $(date +%s) - start )) s in all"
