#!/usr/bin/env bash
# The test command: installs the ComfyUI host if needed (cached under ~/.cache), then runs
# ruff and the whole test suite against it.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${SPM_HOST:-$HOME/.cache/spm-comfy-host}
bash "$REPO/scripts/install_host.sh" "$HOST"
bash "$REPO/scripts/install_browser.sh"
cd "$REPO"
"$HOST/venv/bin/ruff" check .
COMFYUI_ROOT="$HOST/ComfyUI" "$HOST/venv/bin/python" -m pytest -q "$@"
