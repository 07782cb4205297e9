#!/usr/bin/env bash
# The README's first command: set everything up, then run the main job (a short collaborative
# fine-tune of all-MiniLM-L6-v2 on Rotten Tomatoes through 2 compiled pipeline stages).
# Extra arguments go to `edgert train` (see `edgert train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/edgert train "$@"
