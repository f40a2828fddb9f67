#!/usr/bin/env bash
# What tests/test_browser.py needs: Debian Chromium (headless, driven over the DevTools protocol)
# and the newest ComfyUI frontend (scripts/install_frontend.sh). Idempotent: apt runs only when
# /usr/bin/chromium is missing (it needs root or sudo).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
bash "$(dirname "${BASH_SOURCE[0]}")/install_frontend.sh"
