#!/usr/bin/env bash
# The demo. Until the node pack lands it only installs the host and checks the engine imports.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${SPM_HOST:-$HOME/.cache/spm-comfy-host}
bash "$REPO/scripts/install_host.sh" "$HOST"
cd "$REPO" && "$HOST/venv/bin/python" -c "import spm_core.stack, spm_core.file_format, spm_core.transport; print('spm_core ready')"
echo "The end-to-end demo (Load SPM through a real ComfyUI server) comes with the node pack."
