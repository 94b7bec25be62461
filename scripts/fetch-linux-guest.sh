#!/usr/bin/env bash
# Fetch what the real-Linux-guest tests boot (tests/qemu_harness/linux.py): Debian bookworm's
# kernel (the linux-image-6.1.0-NN-amd64 that linux-image-amd64 depends on) and busybox-static.
# The .debs are fetched with apt from the machine's own sources and unpacked with dpkg-deb;
# nothing is installed (a kernel package's install runs boot hooks). Also installs gdb.
# Idempotent: once DIR's files exist, it only checks gdb.
# Use: bash scripts/fetch-linux-guest.sh [DIR]     (DIR defaults to .cache/linux-guest)
# Leaves: DIR/vmlinuz, DIR/busybox, DIR/qemu_fw_cfg.ko (the kernel's fw_cfg module: it hands
# the kernel's VMCOREINFO to QEMU's vmcoreinfo device) and DIR/kernel-package (name=version).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-$PWD/.cache/linux-guest}
export DEBIAN_FRONTEND=noninteractive
updated=0

apt_update_once() {
    if [ $updated = 0 ]; then
        apt-get update -qq
        updated=1
    fi
}

if ! command -v gdb >/dev/null 2>&1; then
    apt_update_once
    apt-get install -y -qq --no-install-recommends gdb >/dev/null
fi

if [ -s "$dest/vmlinuz" ] && [ -x "$dest/busybox" ] && [ -s "$dest/qemu_fw_cfg.ko" ]; then
    exit 0
fi

# Highest bookworm (not backports) version of the linux-image-amd64 metapackage.
meta_version() {
    apt-cache policy linux-image-amd64 2>/dev/null |
        awk '{sub(/^ +\*\*\*/, "")} /^ +[0-9]/ && $2 ~ /^-?[0-9]+$/ && $1 !~ /bpo/ {print $1}' |
        sort -V | tail -1
}
ver=$(meta_version)
if [ -z "$ver" ]; then
    apt_update_once
    ver=$(meta_version)
fi
if [ -z "$ver" ]; then
    # No bookworm kernel at all: fall back to whatever linux-image-amd64 resolves to.
    ver=$(apt-cache policy linux-image-amd64 | awk '/Candidate:/ {print $2}')
fi
[ -n "$ver" ] && [ "$ver" != "(none)" ] || {
    echo "fetch-linux-guest: no linux-image-amd64 in the apt sources" >&2
    exit 1
}
# "Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)" -> the real image package.
kpkg=$(apt-cache show "linux-image-amd64=$ver" |
    awk -F': ' '/^Depends:/ {print $2; exit}' | tr ',' '\n' |
    awk '$1 ~ /^linux-image-[0-9]/ {print $1; exit}')
[ -n "$kpkg" ] || { echo "fetch-linux-guest: cannot resolve linux-image-amd64=$ver" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-linux-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static) || {
    apt_update_once
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static)
}
mkdir -p "$dest" "$tmp/k" "$tmp/b"
# Only the kernel and one module of the kernel package: the rest of its ~400 MB of modules is
# not needed (the guest uses built-in drivers), and dpkg-deb's tar stream lets us skip it.
dpkg-deb --fsys-tarfile "$tmp"/"$kpkg"_*.deb | tar -x -C "$tmp/k" --wildcards './boot/vmlinuz-*' \
    './lib/modules/*/kernel/drivers/firmware/qemu_fw_cfg.ko'
dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/b"
vmlinuz=$(ls "$tmp"/k/boot/vmlinuz-*)
install -m 0644 "$vmlinuz" "$dest/vmlinuz.tmp"
install -m 0755 "$tmp/b/bin/busybox" "$dest/busybox.tmp"
install -m 0644 "$tmp"/k/lib/modules/*/kernel/drivers/firmware/qemu_fw_cfg.ko "$dest/qemu_fw_cfg.ko"
kver=$(dpkg-deb -f "$tmp"/"$kpkg"_*.deb Version)
echo "$kpkg=$kver" > "$dest/kernel-package"
mv "$dest/busybox.tmp" "$dest/busybox"
mv "$dest/vmlinuz.tmp" "$dest/vmlinuz"
echo "fetch-linux-guest: $kpkg $kver and busybox-static in $dest" >&2
