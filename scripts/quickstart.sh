#!/usr/bin/env bash
# The README's first command: set everything up, then run the main job (a short collaborative
# fine-tune of all-MiniLM-L6-v2 on Rotten Tomatoes on 2 local boards, 1F1B pipeline) as an
# unattended run in runs/quickstart: checkpoints, report.html, hf_model/. Ctrl-C stops cleanly;
# the same command continues. Extra arguments go to `edgert run` (e.g. a run.toml; docs/runs.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/edgert run --out runs/quickstart "$@"
