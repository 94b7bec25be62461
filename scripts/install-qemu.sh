#!/usr/bin/env bash
# Install QEMU 10 (and libvirt) from Debian's bookworm-backports suite, and gdb, idempotently.
# The suite entry is derived from the machine's own Debian sources entry, so no
# mirror host is named here.
set -euo pipefail

want_libvirt=0
[ "${1:-}" = "--libvirt" ] && want_libvirt=1

have_qemu10() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 &&
        qemu-system-x86_64 --version | grep -Eq 'version (9|1[0-9])\.'
}

have_tools() {
    for t in gdb lzop zstd xz bzip2 crash; do command -v "$t" >/dev/null 2>&1 || return 1; done
    { command -v makedumpfile >/dev/null 2>&1 || [ -x /usr/sbin/makedumpfile ]; } &&
        ldconfig -p | grep 'libdeflate\.so\.0' >/dev/null
}

if have_qemu10 && have_tools &&
    { [ $want_libvirt = 0 ] || command -v virsh >/dev/null 2>&1; }; then
    exit 0
fi

src=/etc/apt/sources.list.d/fixedram-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        # deb822: take the URIs of the stanza that carries the plain 'bookworm' suite.
        uri=$(awk '/^URIs:/{u=$2} /^Suites:/{for(i=2;i<=NF;i++) if($i=="bookworm"){print u; exit}}' \
            /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    fi
    if [ -z "$uri" ]; then
        echo "install-qemu: no Debian bookworm sources entry to derive backports from" >&2
        exit 1
    fi
    cat > "$src" <<EOT
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# gdb: the Linux-guest tests open cores with it; lzop: libvirt's lzop save images are decoded
# by the lzop program (no maintained Python binding reads lzop's file format); lzop, zstd, xz
# and bzip2 are also what libvirt runs to write compressed images; crash and makedumpfile
# read the kdump files of `extract --format kdump` in the Linux-guest tests, whose zlib pages
# go through libdeflate when the system has it (less than half zlib's CPU time).
pkgs="qemu-system-x86 qemu-utils gdb lzop zstd xz-utils bzip2 crash makedumpfile libdeflate0"
[ $want_libvirt = 1 ] && pkgs="$pkgs libvirt-daemon-system libvirt-clients"
# shellcheck disable=SC2086
apt-get install -y -qq -o Dpkg::Options::=--force-confold --no-install-recommends \
    -t bookworm-backports $pkgs binutils >/dev/null
have_qemu10 || { echo "install-qemu: QEMU >= 9 not installed" >&2; exit 1; }
