"""Pointer-array markers in device state: the vmdesc type "nullptr" (QEMU up to
11.0, byte '0') and its successor "ptr-marker" ('0' for a NULL element, '1' in
front of a present element of an auto-allocated array).

The trailers are built as QEMU's ``vmstate_save_vmsd_v`` (migration/vmstate.c)
writes them: a run of NULL elements of a compressible pointer array is one
entry with ``array_len`` and ``size`` 1 (the first marker's bytes); an
auto-allocated array is never compressed, so each element is a marker entry,
followed for a present element by the element's own entry under the same name
(neither with ``index`` or ``array_len``: QEMU adds them only when more than
one element is described at once). Each device ends with a field after the
markers, so a marker read at any other width misaligns it and the section
fails to end where it does.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixedram.errors import CorruptFile
from fixedram.format.devstate import decode_devices
from fixedram.format.machine import DeviceRecord, MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.writer import BlockSpec, StreamWriter

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]
ELEM = {"vmsd_name": "elem", "version": 1,
        "fields": [{"name": "v", "type": "uint16", "size": 2}]}


def _save(path: Path, dev: DeviceRecord) -> Path:
    state = MachineState("pc-q35-10.0", devices=[dev])
    with open(path, "wb") as f:
        w = StreamWriter(f.write, state, [BlockSpec("pc.ram", 4 * 4096)])
        w.begin()
        w.begin_part(end=True)
        w.pages(0, 0, bytes(4096))
        w.end_part()
        w.finish()
    return path


def _null_run(marker: str) -> DeviceRecord:
    """A compressible array of three uint32 pointers [NULL, NULL, 0x11223344]
    and a uint32 after it: two markers described by one entry, then the element."""
    desc = {"name": "ptrs", "instance_id": 0, "vmsd_name": "ptrs", "version": 1,
            "fields": [{"name": "p", "array_len": 2, "type": marker, "size": 1},
                       {"name": "p", "type": "uint32", "size": 4},
                       {"name": "after", "type": "uint32", "size": 4}]}
    data = b"00" + struct.pack(">II", 0x11223344, 0xCAFEF00D)
    return DeviceRecord("ptrs", 0, 1, 3, data, desc)


def _auto_alloc(data: bytes | None = None, size: int = 1) -> DeviceRecord:
    """An auto-allocated array of three struct pointers [{v: 7}, NULL, {v: 9}]
    (VMS_ARRAY_OF_POINTER_AUTO_ALLOC) and a uint32 after it."""
    marker = {"name": "q", "type": "ptr-marker", "size": size}
    elem = {"name": "q", "type": "struct", "struct": ELEM, "size": 2}
    desc = {"name": "auto", "instance_id": 0, "vmsd_name": "auto", "version": 1,
            "fields": [marker, elem, marker, marker, elem,
                       {"name": "after", "type": "uint32", "size": 4}]}
    if data is None:
        data = b"1" + struct.pack(">H", 7) + b"0" + b"1" + struct.pack(">HI", 9, 0xCAFEF00D)
    return DeviceRecord("auto", 0, 1, 3, data, desc)


def _fields(path: Path) -> dict[str, Any]:
    with MigrationFile(str(path)) as mf:
        devs = decode_devices(mf)
    assert len(devs) == 1
    return devs[0].fields


@pytest.mark.parametrize("marker", ["nullptr", "ptr-marker"])
def test_null_elements_both_spellings(tmp_path: Path, marker: str) -> None:
    path = _save(tmp_path / "s.mig", _null_run(marker))
    assert _fields(path) == {"p": [None, None, 0x11223344], "after": 0xCAFEF00D}
    r = subprocess.run([*FIXEDRAM, "state", "--json", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    [dev] = json.loads(r.stdout)["devices"]
    assert dev["fields"] == {"p": [None, None, 0x11223344], "after": 0xCAFEF00D}


def test_auto_allocated_array(tmp_path: Path) -> None:
    """A '1' marker announces the element after it and holds no value itself."""
    path = _save(tmp_path / "s.mig", _auto_alloc())
    assert _fields(path) == {"q": [{"v": 7}, None, {"v": 9}], "after": 0xCAFEF00D}


@pytest.mark.parametrize("case", ["byte-2", "nullptr-1", "wide", "1-in-run"])
def test_bad_markers_refused(tmp_path: Path, case: str) -> None:
    """What QEMU's loader refuses is a typed error at the marker, and one line on the
    command line: a byte other than '0'/'1', a '1' under the old name (its loader
    takes only '0'), a marker described as wider than its one byte, and a '1'
    inside a run (QEMU never describes present elements together)."""
    if case == "byte-2":
        dev = _auto_alloc(b"2" + struct.pack(">H", 7) + b"0" + b"1"
                          + struct.pack(">HI", 9, 0xCAFEF00D))
        at, needle = 0, "0x32"
    elif case == "nullptr-1":
        dev = _null_run("nullptr")
        dev = DeviceRecord(dev.idstr, 0, 1, 3, b"01" + dev.data[2:], dev.desc)
        at, needle = 1, "0x31"
    elif case == "1-in-run":
        dev = _null_run("ptr-marker")
        dev = DeviceRecord(dev.idstr, 0, 1, 3, b"01" + dev.data[2:], dev.desc)
        at, needle = 0, "'1' in a run of 2"
    else:
        dev = _auto_alloc(b"1\0" + struct.pack(">H", 7) + b"0\0" + b"1\0"
                          + struct.pack(">HI", 9, 0xCAFEF00D), size=2)
        at, needle = 0, "1 byte"
    path = _save(tmp_path / "s.mig", dev)
    with MigrationFile(str(path)) as mf:
        start = mf.sections[0].data_offset
        with pytest.raises(CorruptFile, match=needle) as ei:
            decode_devices(mf)
    assert ei.value.offset == start + at
    r = subprocess.run([*FIXEDRAM, "state", str(path)], capture_output=True, text=True,
                       timeout=60)
    err = r.stderr.strip()
    assert r.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err
