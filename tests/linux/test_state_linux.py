"""``fixedram state`` on saves of a real Linux guest: the vCPU registers of the paused saves
equal HMP ``info registers`` of that paused VM (64-bit: RAX..R15, RIP, RFLAGS, segments,
descriptor tables, CR0/2/3/4, EFER), and every section of every save decodes."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from fixedram.format.devstate import decode_configuration
from fixedram.format.migfile import MigrationFile
from fixedram.format.x86cpu import x86_cpu_states
from qemu_harness import LinuxArtifacts
from test_state import check_against_hmp, cpu_fields, parse_info_registers

pytestmark = pytest.mark.qemu

SAVES = ("paused_stream", "paused_mapped", "live_stream", "live_mapped")
EFER_LMA = 1 << 10
CR0_PG = 1 << 31


def _state_json(*args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "state", *args, "--json"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


@pytest.mark.parametrize("key", ["paused_stream", "paused_mapped"])
def test_paused_registers_equal_info_registers(linux_saves: LinuxArtifacts, key: str) -> None:
    hmp = parse_info_registers(linux_saves.info_registers)
    assert hmp and all("RAX" in cpu for cpu in hmp)  # a 64-bit kernel, in long mode
    doc = _state_json(str(getattr(linux_saves, key)), "--device", "cpu")
    assert [d["instance_id"] for d in doc["devices"]] == list(range(len(hmp)))
    for dev, regs in zip(doc["devices"], hmp, strict=True):
        check_against_hmp(dev["fields"], regs)
    with MigrationFile(getattr(linux_saves, key)) as mf:
        cpus = x86_cpu_states(mf.devices())
    for c, regs in zip(cpus, hmp, strict=True):
        check_against_hmp(cpu_fields(c), regs)


@pytest.mark.parametrize("key", SAVES)
def test_every_section_decodes(linux_saves: LinuxArtifacts, key: str) -> None:
    path = getattr(linux_saves, key)
    with MigrationFile(path) as mf:
        devs = mf.devices()
        assert [(d.name, d.instance_id, d.offset) for d in devs] == [
            (s.idstr, s.instance_id, s.data_offset) for s in mf.sections]
        conf = decode_configuration(mf)
    assert conf["name"] == linux_saves.machine
    caps = conf.get("configuration/capabilities", {}).get("capabilities", [])
    assert caps == (["mapped-ram"] if key.endswith("mapped") else [])
    gs = next(d for d in devs if d.name == "globalstate").fields
    want = b"paused" if key.startswith("paused") else b"running"
    assert gs["runstate"][:gs["size"]].rstrip(b"\0") == want
    for c in x86_cpu_states(devs):  # a booted x86-64 kernel runs paged, in long mode
        assert c.efer & EFER_LMA and c.cr[0] & CR0_PG
    doc = _state_json(str(path))
    assert doc["configuration"] == conf
    assert [d["name"] for d in doc["devices"]] == [d.name for d in devs]
