#!/usr/bin/env bash
# Debian Chromium for tests/test_browser.py (headless, driven over the DevTools protocol).
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (or sudo) for apt.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
