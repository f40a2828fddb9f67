#!/usr/bin/env bash
# README command 1: install the ComfyUI host if needed, then run the demo (scripts/demo.py).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${SPM_HOST:-$HOME/.cache/spm-comfy-host}
bash "$REPO/scripts/install_host.sh" "$HOST"
"$HOST/venv/bin/python" "$REPO/scripts/demo.py" "$HOST/ComfyUI" "${1:-$REPO/out/demo}"
