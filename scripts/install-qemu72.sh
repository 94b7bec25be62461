#!/usr/bin/env bash
# Unpack Debian 12's QEMU 7.2 next to the installed QEMU 10, for the optional
# cross-version test (tests/bridge/test_bridge_qemu72.py). Nothing is installed
# system-wide: the .debs are downloaded with apt (from the machine's own
# bookworm sources) and extracted under build/qemu72. Idempotent.
# Use: bash scripts/install-qemu72.sh   -> prints the qemu-system-x86_64 path
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${FIXEDRAM_QEMU72_DIR:-$PWD/build/qemu72}
bin=$dest/root/usr/bin/qemu-system-x86_64
if [ -x "$bin" ] && [ -e "$dest/root/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so" ]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$dest/debs"
ver=$(apt-cache policy qemu-system-x86 | awk '$1 ~ /^1:7\.2/ {print $1; exit}')
[ -n "$ver" ] || ver=$(apt-cache policy qemu-system-x86 | awk '$2 ~ /^1:7\.2/ {print $2; exit}')
if [ -z "$ver" ]; then
    apt-get update -qq
    ver=$(apt-cache policy qemu-system-x86 | grep -Eo '1:7\.2[^ ]+' | head -1)
fi
[ -n "$ver" ] || { echo "install-qemu72: no QEMU 7.2 in the apt sources" >&2; exit 1; }
datav=$(apt-cache policy qemu-system-data | grep -Eo '1:7\.2[^ ]+' | head -1)
# qemu-system-common holds the TCG accelerator module of this build.
(cd "$dest/debs" && apt-get download -qq "qemu-system-x86=$ver" "qemu-system-common=$ver" \
    "qemu-system-data=$datav")
for d in "$dest"/debs/*.deb; do dpkg -x "$d" "$dest/root"; done
# 7.2 needs libraries that QEMU 10's packages may not have pulled in.
missing=$(ldd "$bin" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
    echo "install-qemu72: missing libraries: $missing" >&2
    exit 1
fi
"$bin" --version >/dev/null
echo "$bin"
