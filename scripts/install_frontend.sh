#!/usr/bin/env bash
# The newest ComfyUI frontend (comfyui-frontend-package, the version pinned in
# scripts/frontend_newest.txt) for tests/test_browser.py, installed once into
# ~/.cache/spm-frontend-<version> (SPM_FRONTEND_CACHE overrides ~/.cache). The server serves it with
# --front-end-root <that folder>/comfyui_frontend_package/static. Idempotent.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${SPM_HOST:-$HOME/.cache/spm-comfy-host}
VERSION=$(grep -v '^#' "$REPO/scripts/frontend_newest.txt" | tr -d '[:space:]')
TARGET=${SPM_FRONTEND_CACHE:-$HOME/.cache}/spm-frontend-$VERSION
[ -f "$TARGET/comfyui_frontend_package/static/index.html" ] && exit 0
PYTHON="$HOST/venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3
rm -rf "$TARGET.partial"
"$PYTHON" -m pip install --quiet --no-deps --target "$TARGET.partial" "comfyui-frontend-package==$VERSION"
rm -rf "$TARGET"
mv "$TARGET.partial" "$TARGET"
echo "comfyui-frontend-package $VERSION in $TARGET"
