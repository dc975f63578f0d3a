#!/usr/bin/env bash
# The end-to-end suite's browser: Debian's headless-capable Chromium and its WebDriver, plus CJK
# fonts (DB-GPT's UI has Chinese labels). Distribution packages only: no browser downloads.
# Idempotent: does nothing when both programs are already there. Needs root (CI runs as root).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: chromium/chromedriver missing; run as root:" \
        "apt-get update && apt-get install -y chromium chromium-driver fonts-noto-cjk" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-noto-cjk
