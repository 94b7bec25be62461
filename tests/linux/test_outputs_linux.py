"""What fixedram writes from a real Linux guest's saves is a whole machine, described truthfully.

Conversions both ways keep every device section byte for byte, carry the vmdesc QEMU 10 writes
for the output's capabilities (compared with QEMU's own save of the same paused state), and the
converted file loads back into QEMU with the same RAM (pmemsave) and the same registers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixedram.format.migfile import MigrationFile
from fixedram.tools.convert import convert_file
from qemu_harness import LinuxArtifacts, LinuxGuest, diff_pages, file_uri
from util import assert_truthful_vmdesc

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("src,to,twin", [("paused_stream", "mapped-ram", "paused_mapped"),
                                         ("paused_mapped", "stream", "paused_stream"),
                                         ("live_stream", "mapped-ram", "live_mapped")])
def test_converted_linux_saves_describe_themselves(linux_saves: LinuxArtifacts, tmp_path: Path,
                                                   src: str, to: str, twin: str) -> None:
    path = getattr(linux_saves, src)
    out = tmp_path / "out.sav"
    convert_file(str(path), str(out), to)
    assert_truthful_vmdesc(out)
    with MigrationFile(out) as mf, MigrationFile(path) as orig, \
            MigrationFile(getattr(linux_saves, twin)) as qemu_own:
        assert mf.vmdesc is not None and qemu_own.vmdesc is not None
        assert mf.vmdesc.doc["configuration"] == qemu_own.vmdesc.doc["configuration"]
        assert [d.fields for d in mf.devices()] == [d.fields for d in orig.devices()]


def test_converted_paused_save_loads_with_same_state(linux_saves: LinuxArtifacts,
                                                     tmp_path: Path) -> None:
    """The mapped-ram conversion of the paused stream loads into QEMU 10: RAM equals the
    source's pmemsave and `info registers` equals the source's."""
    out = tmp_path / "conv.sav"
    convert_file(str(linux_saves.paused_stream), str(out), "mapped-ram")
    meta = linux_saves.meta
    with LinuxGuest(tmp_path, Path(meta["kernel"]), Path(meta["initrd"]),
                    machine=linux_saves.machine, memory=linux_saves.ram_size,
                    vmcoreinfo=meta["vmcoreinfo"], name="dst", incoming=True,
                    paused=True) as vm:
        vm.set_caps(**{"mapped-ram": True})
        vm.migrate_incoming(file_uri(out))
        got = vm.pmemsave(0, linux_saves.ram_size, tmp_path / "dst.pmem")
        bad = diff_pages(linux_saves.pmem.read_bytes(), got.read_bytes(),
                         linux_saves.compare_ranges)
        assert not bad, f"{len(bad)} pages differ, first 0x{bad[0]:x}"
        regs = vm.qmp("human-monitor-command", **{"command-line": "info registers"})
        # HMP answers with \r\n line ends; the saved text has \n
        assert regs.splitlines() == linux_saves.info_registers.splitlines()
