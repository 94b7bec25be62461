"""Every file fixedram writes describes itself as QEMU 10 would: configuration, devices, vmdesc.

QEMU's loader ignores the vmdesc trailer, so a stale one goes unnoticed until an analyzer
(QEMU's analyze-migration, ``fixedram state``) reads the file. These tests compare our
outputs with what real QEMU 10 writes for the same machine and capability set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fixedram.errors import CorruptFile
from fixedram.format.devstate import decode_configuration
from fixedram.format.machine import DeviceRecord, MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.stream import configuration_desc
from fixedram.tools.convert import convert_file
from qemu_harness import SavedFile, save_vm
from util import assert_truthful_vmdesc

MiB = 1 << 20


def test_configuration_desc_shapes() -> None:
    """QEMU describes a variable array by its first element plus array_len."""
    assert configuration_desc("pc-q35-10.0") == {
        "vmsd_name": "configuration", "version": 1, "fields": [
            {"name": "len", "type": "uint32", "size": 4},
            {"name": "name", "type": "buffer", "size": 11}]}
    two = configuration_desc("pc-i440fx-10.0", ("mapped-ram", "x-ignore-shared", "multifd"))
    caps = two["subsections"][0]
    assert caps["vmsd_name"] == "configuration/capabilities"
    # enum order, unvalidated capabilities dropped, size of the first element only
    assert caps["fields"][1] == {"name": "capabilities", "array_len": 2, "type": "capability",
                                 "size": 1 + len("x-ignore-shared")}


def test_device_without_description_means_no_trailer() -> None:
    """A trailer is written only when it can describe every device truthfully."""
    dev = DeviceRecord("timer", 0, 2, 3, bytes(24),
                       {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
                        "fields": [{"name": "t", "array_len": 3, "type": "int64", "size": 8}]})
    st = MachineState("pc-q35-10.0", devices=[dev])
    assert st.vmdesc() is not None
    wrong = DeviceRecord("timer", 0, 2, 3, bytes(16), dev.desc)  # 16 bytes, described as 24
    assert MachineState("pc-q35-10.0", devices=[wrong]).vmdesc() is None
    assert st.tail().endswith(json.dumps(st.vmdesc()).encode())


@pytest.fixture(scope="module")
def paused_pair(tmp_path_factory: pytest.TempPathFactory, qemu: str,
                guest_image_factory: Callable[..., Path]) -> dict[str, SavedFile]:
    """QEMU 10's own saves of the same paused q35 guest, with mapped-ram off and on."""
    d = tmp_path_factory.mktemp("paused-pair")
    img = guest_image_factory()
    return {mode: save_vm(d, machine="q35", mode=mode, live=False, image=img, name=mode)
            for mode in ("stream", "mapped-ram")}


@pytest.mark.qemu
@pytest.mark.parametrize("src_mode,to", [("stream", "mapped-ram"), ("mapped-ram", "stream")])
def test_convert_writes_qemus_vmdesc(paused_pair: dict[str, SavedFile], tmp_path: Path,
                                     src_mode: str, to: str) -> None:
    """The converted file's configuration entry is the one QEMU writes for that capability
    set, its device entries are the source's, and everything decodes to the last byte."""
    src = paused_pair[src_mode]
    out = tmp_path / "out.mig"
    convert_file(str(src.path), str(out), to)
    cfg = assert_truthful_vmdesc(out)
    assert ("configuration/capabilities" in cfg) == (to == "mapped-ram")
    with MigrationFile(out) as mf, MigrationFile(paused_pair[to].path) as qemu_own, \
            MigrationFile(src.path) as orig:
        assert mf.vmdesc is not None and qemu_own.vmdesc is not None
        assert orig.vmdesc is not None
        assert mf.vmdesc.doc["configuration"] == qemu_own.vmdesc.doc["configuration"]
        assert mf.vmdesc.doc["devices"] == orig.vmdesc.doc["devices"]
        assert mf.header.capabilities == qemu_own.header.capabilities
        # the device bytes themselves are the source's
        assert [d.fields for d in mf.devices()] == [d.fields for d in orig.devices()]


@pytest.mark.qemu
def test_send_stdout_stream_describes_itself(paused_pair: dict[str, SavedFile],
                                             tmp_path: Path) -> None:
    """`fixedram send FILE -` (what a QEMU behind -incoming exec: reads) is a stream with
    mapped-ram off and a vmdesc for that configuration."""
    out = tmp_path / "sent.mig"
    with open(out, "wb") as f:
        subprocess.run([sys.executable, "-m", "fixedram.cli.main", "send",
                        str(paused_pair["mapped-ram"].path), "-"], stdout=f, check=True)
    cfg = assert_truthful_vmdesc(out)
    assert "configuration/capabilities" not in cfg


@pytest.mark.qemu
def test_stale_vmdesc_is_detected(paused_pair: dict[str, SavedFile], tmp_path: Path) -> None:
    """The defect this guards against: a mapped-ram stream carrying the vmdesc of a
    stream save. QEMU loads it, but the description is wrong, and decoding says so."""
    m, s = paused_pair["mapped-ram"], paused_pair["stream"]
    with MigrationFile(m.path) as mm, MigrationFile(s.path) as ss:
        assert mm.vmdesc is not None and ss.vmdesc is not None
        body = m.path.read_bytes()[:mm.vmdesc.offset]
        forged = tmp_path / "stale.mig"
        forged.write_bytes(body + bytes([6]) + len(ss.vmdesc.raw).to_bytes(4, "big")
                           + ss.vmdesc.raw)
    with MigrationFile(forged) as mf, pytest.raises(CorruptFile, match="configuration"):
        decode_configuration(mf)
