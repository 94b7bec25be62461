#!/usr/bin/env bash
# Start libvirt's daemons by hand (no systemd here), idempotently, for the libvirt tests.
# Installs libvirt first when it is missing (scripts/install-qemu.sh --libvirt).
# QEMU runs as root without cgroups, namespaces or a security driver: this is a
# test container, not a host to protect.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v libvirtd >/dev/null 2>&1 || bash scripts/install-qemu.sh --libvirt

conf=/etc/libvirt/qemu.conf
if ! grep -q '^# fixedram-tests' "$conf"; then
    cat >> "$conf" <<'EOT'
# fixedram-tests: run QEMU as root without cgroups or namespaces (no systemd)
user = "root"
group = "root"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
EOT
fi

up() { virsh -c qemu:///system version >/dev/null 2>&1; }
if up; then
    exit 0
fi
mkdir -p /run/libvirt
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 100); do
    up && exit 0
    sleep 0.1
done
echo "start-libvirt: libvirtd did not come up" >&2
exit 1
