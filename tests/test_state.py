"""Device state decoded through the vmdesc (``fixedram state``, ``MigrationFile.devices()``)
on real QEMU saves: every section decodes to its end, the vCPU registers equal QEMU's own
``info registers`` of the saved VM, and files whose vmdesc disagrees with their bytes are
CorruptFile."""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qemu_harness.vm as hvm
from fixedram.cli.main import main
from fixedram.errors import CorruptFile, FixedramError, UnsupportedFeature
from fixedram.format.devstate import DeviceState, decode_configuration, decode_section
from fixedram.format.migfile import MigrationFile
from fixedram.format.vmdesc import encode_trailer
from fixedram.format.x86cpu import SEG_NAMES, X86CPUState, x86_cpu_states
from qemu_harness import OFFSET_FILL, QemuVM, SavedFile, caps_for_mode, file_uri, save_vm
from util import sparse_prefix

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[1]
QEMU72 = Path(os.environ.get("FIXEDRAM_QEMU72_DIR", ROOT / "build" / "qemu72")) / "root" / \
    "usr" / "bin" / "qemu-system-x86_64"
# PCI vendor:device of the host bridge, as any PCI config space dump shows it.
HOST_BRIDGES = {"pc-q35": ("0000:00:00.0/mch", 0x29C0), "pc-i440fx": ("0000:00:00.0/I440FX",
                                                                      0x1237)}


# -- HMP ``info registers`` -------------------------------------------------------------------

_HMP_REG = re.compile(r"\b([A-Z][A-Z0-9]*) ?=\s*([0-9a-f]+)((?: [0-9a-f]+)*)")
GPR64 = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
         "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")


def parse_info_registers(text: str) -> list[dict[str, list[int]]]:
    """One dict per ``CPU#n`` block: register name -> the hex numbers printed after '='."""
    blocks = re.split(r"CPU#\d+", text)
    blocks = blocks[1:] if len(blocks) > 1 else blocks
    out = []
    for b in blocks:
        regs: dict[str, list[int]] = {}
        for m in _HMP_REG.finditer(b):
            regs.setdefault(m.group(1), [int(x, 16) for x in (m.group(2) + m.group(3)).split()])
        out.append(regs)
    return out


def cpu_fields(c: X86CPUState) -> dict[str, Any]:
    """An X86CPUState in the vmdesc's field names, to compare it like a decoded section."""
    def seg(s: Any) -> dict[str, int]:
        return {"selector": s.selector, "base": s.base, "limit": s.limit, "flags": s.flags}
    return {"env.regs": list(c.regs), "env.eip": c.rip, "env.eflags": c.rflags,
            "env.segs": [seg(s) for s in c.segs], "env.ldt": seg(c.ldt), "env.tr": seg(c.tr),
            "env.gdt": seg(c.gdt), "env.idt": seg(c.idt), "env.cr[0]": c.cr[0],
            "env.cr[2]": c.cr[2], "env.cr[3]": c.cr[3], "env.cr[4]": c.cr[4],
            "env.efer": c.efer}


def check_against_hmp(f: Mapping[str, Any], hmp: dict[str, list[int]]) -> None:
    """Decoded ``cpu`` fields equal what HMP printed for that vCPU (32- or 64-bit layout)."""
    long_mode = "RAX" in hmp
    names = GPR64 if long_mode else tuple("E" + n[1:] for n in GPR64[:8])
    mask = (1 << 64) - 1 if long_mode else 0xFFFFFFFF
    got = {n: f["env.regs"][i] & mask for i, n in enumerate(names)}
    assert got == {n: hmp[n][0] for n in names}
    ip, fl = ("RIP", "RFL") if long_mode else ("EIP", "EFL")
    assert (f["env.eip"] & mask, f["env.eflags"] & mask) == (hmp[ip][0], hmp[fl][0])
    for i, n in enumerate(SEG_NAMES):
        s = f["env.segs"][i]
        assert [s["selector"], s["base"] & mask, s["limit"], s["flags"]] == hmp[n.upper()], n
    for n in ("ldt", "tr"):
        s = f[f"env.{n}"]
        assert [s["selector"], s["base"] & mask, s["limit"], s["flags"]] == hmp[n.upper()], n
    for n in ("gdt", "idt"):
        s = f[f"env.{n}"]
        assert [s["base"] & mask, s["limit"]] == hmp[n.upper()], n
    for i in (0, 2, 3, 4):
        assert f[f"env.cr[{i}]"] == hmp[f"CR{i}"][0], f"CR{i}"
    assert f["env.efer"] == hmp["EFER"][0]


# -- saving a VM together with its registers ------------------------------------------------


def save_with_registers(workdir: Path, image: Path, *, machine: str, mode: str, live: bool,
                        offset: int = 0, smp: int = 1, name: str = "regs",
                        binary: Path | None = None) -> tuple[Path, str, str]:
    """Save a guest with QEMU and return (file, HMP ``info registers -a``, machine type).

    Paused: the registers are read after ``stop`` and before the save. Live: after the save
    completes (the source is then stopped in the state it saved).
    """
    path = workdir / f"{name}.mig"
    extra = ["-smp", str(smp)]
    if binary is not None:  # QEMU 7.2: its own modules, the system firmware, no file: URI
        extra += ["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]
        uri = f"exec:cat > {path}"
    else:
        if offset:
            path.write_bytes(OFFSET_FILL * offset)
        uri = file_uri(path, offset)
    old = hvm.QEMU_BINARY
    if binary is not None:
        hvm.QEMU_BINARY = str(binary)
        os.environ["QEMU_MODULE_DIR"] = str(binary.parents[1] / "lib" / "x86_64-linux-gnu" /
                                            "qemu")
    try:
        vm = QemuVM(workdir, image, machine=machine, memory="128M", name=name,
                    extra_args=extra).launch()
    finally:
        hvm.QEMU_BINARY = old
        os.environ.pop("QEMU_MODULE_DIR", None)
    with vm:
        vm.wait_for_progress(2, timeout=30)
        if binary is None:
            vm.set_caps(**caps_for_mode(mode))
            if mode == "mapped-ram-multifd":
                vm.set_params(multifd_channels=2)
        # Unthrottled, and a downtime limit that lets a live save finish after its first pass.
        vm.set_params(max_bandwidth=1 << 30, downtime_limit=30_000)
        regs = ""
        if not live:
            vm.stop()
            regs = vm.qmp("human-monitor-command", command_line="info registers -a")
        vm.migrate(uri, timeout=120)
        if live:
            regs = vm.qmp("human-monitor-command", command_line="info registers -a")
        resolved = vm.machine_name()
    return path, regs, resolved


def cli_state(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    """Run ``fixedram state`` in-process: (exit code, parsed --json output or text, stderr)."""
    capsys.readouterr()
    rc = main(["state", *args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if "--json" in args and rc == 0 else out), err


def check_devices(mf: MigrationFile, devs: list[DeviceState], *, machine: str, paused: bool,
                  mapped: bool) -> None:
    """Facts every decoded save must show, each checkable without our decoder."""
    assert [(d.name, d.instance_id, d.section_id, d.version_id, d.offset) for d in devs] == [
        (s.idstr, s.instance_id, s.section_id, s.version_id, s.data_offset)
        for s in mf.sections]
    assert {s.sized_by for s in mf.sections} == {"vmdesc"}
    names = {d.name for d in devs}
    assert {"timer", "cpu_common", "cpu", "apic", "globalstate"} <= names
    # globalstate records the run state the source had when it saved.
    gs = next(d for d in devs if d.name == "globalstate").fields
    want = b"paused" if paused else b"running"
    assert gs["runstate"][:gs["size"]].rstrip(b"\0") == want
    # The host bridge's PCI config space starts with Intel's vendor id and its device id.
    idstr, dev_id = next(v for k, v in HOST_BRIDGES.items() if machine.startswith(k))
    pci = next(d for d in devs if d.name == idstr).fields["parent_obj"]
    cfg = next(v for k, v in pci.items() if k.startswith("config"))
    assert int.from_bytes(cfg[0:2], "little") == 0x8086
    assert int.from_bytes(cfg[2:4], "little") == dev_id
    assert pci["irq_state"] == [0, 0, 0, 0]
    conf = decode_configuration(mf)
    assert conf["name"] == machine == mf.machine
    assert conf["len"] == len(machine)
    caps = conf.get("configuration/capabilities", {}).get("capabilities", [])
    assert caps == (["mapped-ram"] if mapped else [])


# -- real QEMU 10 saves -------------------------------------------------------------------------

SAVES = [
    pytest.param("pc", "stream", False, 0, id="pc-stream-paused"),
    pytest.param("q35", "mapped-ram", False, 4096, id="q35-mapped-paused-offset"),
    pytest.param("q35", "stream", True, 0, id="q35-stream-live"),
    pytest.param("pc", "mapped-ram-multifd", True, 8192, id="pc-mapped-multifd-live-offset"),
]


@pytest.mark.parametrize(("machine", "mode", "live", "offset"), SAVES)
def test_every_device_decodes(saved_file: Callable[..., SavedFile], machine: str, mode: str,
                              live: bool, offset: int,
                              capsys: pytest.CaptureFixture[str]) -> None:
    saved = saved_file(machine=machine, mode=mode, live=live, offset=offset, min_syncs=2)
    with MigrationFile(saved.path) as mf:
        assert mf.start == offset
        devs = mf.devices()
        check_devices(mf, devs, machine=saved.machine, paused=not live,
                      mapped=mode != "stream")
        conf = decode_configuration(mf)
    rc, doc, err = cli_state(str(saved.path), "--json", "--offset", str(offset), capsys=capsys)
    assert rc == 0, err
    assert list(doc) == ["schema_version", "configuration", "devices"]
    assert doc["schema_version"] == 1 and doc["configuration"] == conf
    assert [(d["name"], d["instance_id"]) for d in doc["devices"]] == [
        (d.name, d.instance_id) for d in devs]
    cpu = next(d for d in doc["devices"] if d["name"] == "cpu")
    assert list(cpu) == ["section_id", "name", "instance_id", "version_id", "fields"]
    want = next(d for d in devs if d.name == "cpu").fields
    assert cpu["fields"]["env.eip"] == want["env.eip"] and cpu["fields"]["env.regs"] == \
        want["env.regs"]
    # Buffers are hex strings in JSON.
    gs = next(d for d in doc["devices"] if d["name"] == "globalstate")["fields"]
    assert bytes.fromhex(gs["runstate"]).startswith(b"paused" if not live else b"running")
    rc, text, err = cli_state(str(saved.path), "--device", "cpu", capsys=capsys)
    assert rc == 0, err
    assert f"env.eip: 0x{want['env.eip']:x}" in text and "globalstate" not in text


REG_SAVES = [
    pytest.param("pc", "stream", False, 0, 1, id="pc-stream-paused"),
    pytest.param("q35", "mapped-ram", False, 4096, 2, id="q35-mapped-paused-offset-smp2"),
    pytest.param("q35", "stream", True, 0, 1, id="q35-stream-live"),
]


@pytest.mark.parametrize(("machine", "mode", "live", "offset", "smp"), REG_SAVES)
def test_cpu_registers_equal_info_registers(tmp_path: Path, guest_image: Path, machine: str,
                                            mode: str, live: bool, offset: int, smp: int,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, text, resolved = save_with_registers(tmp_path, guest_image, machine=machine,
                                               mode=mode, live=live, offset=offset, smp=smp)
    hmp = parse_info_registers(text)
    assert len(hmp) == smp
    with MigrationFile(path) as mf:
        devs = mf.devices()
        check_devices(mf, devs, machine=resolved, paused=not live, mapped=mode != "stream")
    cpus = x86_cpu_states(devs)
    assert [c.index for c in cpus] == list(range(smp))
    rc, doc, err = cli_state(str(path), "--json", "--device", "cpu", capsys=capsys)
    assert rc == 0, err
    assert [d["instance_id"] for d in doc["devices"]] == list(range(smp))
    for c, d, regs in zip(cpus, doc["devices"], hmp, strict=True):
        check_against_hmp(d["fields"], regs)
        check_against_hmp(cpu_fields(c), regs)


def test_configuration_uuid_and_two_capabilities(tmp_path: Path, guest_image: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The capability array is described by its first element only (array_len 2, size 16
    for 'x-ignore-shared'), so each name is read by its own length byte."""
    uuid = "12345678-9abc-def0-1122-334455667788"
    path = tmp_path / "uuid.mig"
    with QemuVM(tmp_path, guest_image, machine="q35", name="uuid",
                extra_args=["-uuid", uuid]).launch() as vm:
        vm.wait_for_progress(1, timeout=30)
        vm.stop()
        vm.set_caps(**{"validate-uuid": True, "x-ignore-shared": True, "mapped-ram": True})
        vm.migrate(file_uri(path))
    with MigrationFile(path) as mf:
        assert mf.vmdesc is not None
        caps_desc = mf.vmdesc.doc["configuration"]["subsections"][0]["fields"][1]
        assert (caps_desc["array_len"], caps_desc["size"]) == (2, 1 + len("x-ignore-shared"))
        conf = decode_configuration(mf)
        mf.devices()
    assert conf["configuration/capabilities"] == {
        "caps_count": 2, "capabilities": ["x-ignore-shared", "mapped-ram"]}
    assert conf["configuration/uuid"] == {"uuid.data": bytes.fromhex(uuid.replace("-", ""))}
    rc, doc, err = cli_state(str(path), "--json", "--device", "timer", capsys=capsys)
    assert rc == 0, err
    assert doc["configuration"]["configuration/uuid"]["uuid.data"] == uuid.replace("-", "")


def test_qemu72_file(tmp_path: Path, guest_image: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    """QEMU 7.2 writes no vmdesc ``configuration`` entry: the header's facts stand in."""
    if not QEMU72.exists():
        pytest.skip("QEMU 7.2 not unpacked (run scripts/install-qemu72.sh)")
    path, text, resolved = save_with_registers(tmp_path, guest_image, machine="pc-i440fx-7.2",
                                               mode="stream", live=False, binary=QEMU72)
    with MigrationFile(path) as mf:
        assert mf.vmdesc is not None and "configuration" not in mf.vmdesc.doc
        devs = mf.devices()
        check_devices(mf, devs, machine=resolved, paused=True, mapped=False)
        assert decode_configuration(mf) == {"len": 13, "name": "pc-i440fx-7.2"}
    (cpu,) = x86_cpu_states(devs)
    (regs,) = parse_info_registers(text)
    check_against_hmp(cpu_fields(cpu), regs)
    rc, doc, err = cli_state(str(path), "--json", capsys=capsys)
    assert rc == 0, err
    assert doc["configuration"] == {"len": 13, "name": "pc-i440fx-7.2"}


# -- disagreement between the vmdesc and the bytes ----------------------------------------------


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory, qemu: str,
               guest_image_factory: Callable[..., Path]) -> dict[str, SavedFile]:
    d = tmp_path_factory.mktemp("state")
    img = guest_image_factory(mem_end=4 << 20)  # small: copies stay cheap
    return {"mapped": save_vm(d, machine="q35", mode="mapped-ram", live=False, image=img,
                              name="mapped"),
            "stream": save_vm(d, machine="pc", mode="stream", live=False, image=img,
                              name="stream")}


def with_trailer(src: Path, dst: Path, doc: Any) -> None:
    """``dst``: ``src`` with its vmdesc trailer replaced by ``doc`` (an object or raw bytes)."""
    with MigrationFile(src) as mf:
        assert mf.vmdesc is not None
        at = mf.vmdesc.offset
    sparse_prefix(src, dst, at)
    with open(dst, "ab") as f:
        f.write(encode_trailer(doc))


def vmdesc_doc(path: Path) -> dict[str, Any]:
    with MigrationFile(path) as mf:
        assert mf.vmdesc is not None
        return copy.deepcopy(mf.vmdesc.doc)


def test_struct_arrays_in_one_unpack_equal_field_by_field(
        real_files: dict[str, SavedFile], monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays of plain structs (q35's AHCI NCQ slots) decode in one unpack, to exactly
    what the field-by-field walk gives, types included."""
    from fixedram.format import devstate

    def shapes(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: shapes(v) for k, v in x.items()}
        if isinstance(x, list):
            return [shapes(v) for v in x]
        return (type(x).__name__, x)

    used = []
    flat = devstate._Walk.flat_structs

    def counting(self: Any, *args: Any) -> Any:
        used.append(args)
        return flat(self, *args)

    for saved in real_files.values():
        with MigrationFile(saved.path) as mf:
            monkeypatch.setattr(devstate._Walk, "flat_structs", counting)
            fast = [shapes(d.fields) for d in devstate.decode_devices(mf)]
            monkeypatch.setattr(devstate._Walk, "plan", lambda self, desc, size: None)
            slow = [shapes(d.fields) for d in devstate.decode_devices(mf)]
            monkeypatch.undo()
        assert fast == slow
    assert used  # the q35 file has such arrays


def test_libvirt_raw_image(real_files: dict[str, SavedFile], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """A stream behind a libvirt save header (raw format, as ``virsh save`` writes): the same
    fields, at offsets shifted by the header, XML and padding."""
    src = real_files["stream"].path
    xml = b"<domain type='qemu'><name>x</name></domain>\n\0"
    data_len = 4096 - 92  # the QEMU stream then starts at 4096
    img = tmp_path / "vm.save"
    with open(img, "wb") as f:
        f.write(struct.pack("<16s5I56x", b"LibvirtQemudSave", 2, data_len, 0, 0, len(xml)))
        f.write(xml.ljust(data_len, b"\0"))
        f.write(src.read_bytes())
    with MigrationFile(src) as mf:
        plain = mf.devices()
        plain_conf = decode_configuration(mf)
    with MigrationFile(img) as mf:
        assert mf.libvirt is not None and mf.start == 4096
        devs = mf.devices()
        assert decode_configuration(mf) == plain_conf
    assert [(d.name, d.offset - 4096, d.fields) for d in devs] == [
        (d.name, d.offset, d.fields) for d in plain]
    rc, doc, err = cli_state(str(img), "--json", capsys=capsys)
    assert rc == 0, err
    assert len(doc["devices"]) == len(plain)


def test_configuration_subsection_missing_from_vmdesc(real_files: dict[str, SavedFile],
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = real_files["mapped"].path
    doc = vmdesc_doc(src)
    assert [s["vmsd_name"] for s in doc["configuration"]["subsections"]] == \
        ["configuration/capabilities"]
    del doc["configuration"]["subsections"]  # analyze-migration: "Unknown section type: 5"
    bad = tmp_path / "bad.mig"
    with_trailer(src, bad, doc)
    with MigrationFile(bad) as mf:
        assert mf.capabilities == ["mapped-ram"]  # the stream itself is fine
        with pytest.raises(CorruptFile, match=r"configuration/capabilities.*not described") as e:
            decode_configuration(mf)
        assert e.value.offset == mf.header.offset + 9 + 4 + len("pc-q35-10.0")
    rc, _, err = cli_state(str(bad), "--json", capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "not described by the vmdesc" in err


def test_configuration_subsection_missing_from_stream(real_files: dict[str, SavedFile],
                                                      tmp_path: Path) -> None:
    src = real_files["stream"].path
    doc = vmdesc_doc(src)
    assert "subsections" not in doc["configuration"]
    # analyze-migration: "Subsection configuration/capabilities not found"
    doc["configuration"]["subsections"] = [{
        "vmsd_name": "configuration/capabilities", "version": 1, "fields": [
            {"name": "caps_count", "type": "uint32", "size": 4},
            {"name": "capabilities", "type": "capability", "size": 11}]}]
    bad = tmp_path / "bad.mig"
    with_trailer(src, bad, doc)
    with MigrationFile(bad) as mf, pytest.raises(
            CorruptFile, match="'configuration/capabilities' described by the vmdesc is not in "
                               "the stream") as e:
        decode_configuration(mf)
    assert e.value.offset == mf.header.end


def _cpu_subsection_marker(mf: MigrationFile) -> tuple[int, str]:
    """Absolute offset of the first subsection marker of the cpu section, and its name."""
    assert mf.vmdesc is not None
    desc = next(d for d in mf.vmdesc.doc["devices"] if d["name"] == "cpu")
    name = desc["subsections"][0]["vmsd_name"]
    sec = next(s for s in mf.sections if s.idstr == "cpu")
    data = os.pread(mf.fd, sec.data_length, sec.data_offset)
    i = data.find(bytes([5, len(name)]) + name.encode())
    assert i > 0
    return sec.data_offset + i, name


@pytest.mark.parametrize(("delta", "match"), [
    (0, "subsection 'cpu/.*' described by the vmdesc is not in the stream"),  # marker byte
    (7, "subsection 'cpu/.*' in the stream where the vmdesc has 'cpu/"),  # a name byte
])
def test_broken_subsection_marker_names_the_device(real_files: dict[str, SavedFile],
                                                   tmp_path: Path, delta: int, match: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = real_files["stream"].path
    bad = tmp_path / "bad.mig"
    sparse_prefix(src, bad, src.stat().st_size)
    with MigrationFile(bad) as mf:
        at, _ = _cpu_subsection_marker(mf)
    with open(bad, "r+b") as f:
        f.seek(at + delta)
        b = f.read(1)
        f.seek(at + delta)
        f.write(bytes([b[0] ^ 0x20]))
    # Located by the vmdesc sizes, so the walk itself is fine: only decoding fails.
    with MigrationFile(bad) as mf, pytest.raises(CorruptFile, match=match) as e:
        mf.devices()
    assert "device 'cpu' instance 0" in str(e.value) and e.value.offset == at
    rc, _, err = cli_state(str(bad), capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "'cpu'" in err and f"offset {at}" in err


def test_left_over_and_missing_bytes(real_files: dict[str, SavedFile]) -> None:
    """A description that covers less, or more, than the section's bytes."""
    with MigrationFile(real_files["stream"].path) as mf:
        assert mf.vmdesc is not None
        desc = next(d for d in mf.vmdesc.doc["devices"] if d["name"] == "cpu")
        sec = next(s for s in mf.sections if s.idstr == "cpu")
        data = os.pread(mf.fd, sec.data_length, sec.data_offset)
    assert decode_section(desc, data, who="cpu")["env.eip"] > 0
    fewer = copy.deepcopy(desc)
    dropped = fewer["subsections"].pop()["vmsd_name"]
    with pytest.raises(CorruptFile, match=f"subsection '{dropped}' in the stream is not "
                                          "described"):
        decode_section(fewer, data, who="cpu")
    with pytest.raises(CorruptFile, match="bytes left over"):
        decode_section(desc, data + b"\x00\x00", who="cpu")
    with pytest.raises(CorruptFile, match="needs 8 bytes but 4 are left"):
        decode_section({"fields": [{"name": "x", "type": "uint64", "size": 8}]}, b"abcd",
                       who="cpu")
    wider = copy.deepcopy(desc)
    wider["fields"][0]["array_len"] = 17  # env.regs
    with pytest.raises(CorruptFile):
        decode_section(wider, data, who="cpu")


def test_cpu_mapping_refuses_unknown_sections(real_files: dict[str, SavedFile]) -> None:
    with MigrationFile(real_files["stream"].path) as mf:
        devs = mf.devices()
    (cpu,) = x86_cpu_states(devs)
    assert cpu.rip == next(d for d in devs if d.name == "cpu").fields["env.eip"]
    dev = next(d for d in devs if d.name == "cpu")
    newer = DeviceState(dev.section_id, "cpu", 0, 13, dev.offset, dev.fields)
    with pytest.raises(UnsupportedFeature, match=r"version 13.*unknown section version"):
        x86_cpu_states([newer])
    f32 = dict(dev.fields, **{"env.regs": dev.fields["env.regs"][:8]})  # an i386 target
    with pytest.raises(UnsupportedFeature, match=r"'env\.regs' is not an array of 16"):
        x86_cpu_states([DeviceState(dev.section_id, "cpu", 0, 12, dev.offset, f32)])
    nocr = {k: v for k, v in dev.fields.items() if k != "env.cr[3]"}
    with pytest.raises(UnsupportedFeature, match=r"'env.cr\[3\]' is missing"):
        x86_cpu_states([DeviceState(dev.section_id, "cpu", 0, 12, dev.offset, nocr)])


# -- the vmdesc is untrusted: mutations never crash -----------------------------------------------

_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                  st.sampled_from(["uint8", "uint64", "struct", "capability", "nullptr",
                                   "bool", "float64", "tmp", "pci irq state", "buffer",
                                   "cpu/x", "configuration/capabilities", ""]),
                  st.text(max_size=6))
_VALUE = st.one_of(_LEAF, st.lists(_LEAF, max_size=3),
                   st.dictionaries(st.sampled_from(["fields", "name", "type", "size", "struct",
                                                    "array_len", "index", "subsections",
                                                    "vmsd_name", "version"]), _LEAF,
                                   max_size=4))


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        out.append((node, k))
        if isinstance(v, (dict, list)):
            _slots(v, out)
    return out


def _mutate(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        slots = _slots(doc, [])
        node, key = slots[data.draw(st.integers(0, len(slots) - 1))]
        how = data.draw(st.sampled_from(["set", "delete", "dup", "bump"]))
        if how == "delete":
            del node[key]
        elif how == "dup" and isinstance(node, list):
            node.insert(key, copy.deepcopy(node[key]))
        elif how == "bump" and isinstance(node[key], int) and not isinstance(node[key], bool):
            node[key] += data.draw(st.sampled_from([-1, 1, 7, -(1 << 40), 1 << 40]))
        else:
            node[key] = data.draw(_VALUE)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_vmdesc_entries_never_crash(real_files: dict[str, SavedFile],
                                            data: st.DataObject) -> None:
    """The decoder alone, on real section bytes, with mutated descriptions."""
    kind = data.draw(st.sampled_from(["mapped", "stream"]))
    with MigrationFile(real_files[kind].path) as mf:
        assert mf.vmdesc is not None
        doc = _mutate(mf.vmdesc.doc, data)
        devices = doc.get("devices") if isinstance(doc.get("devices"), list) else []
        for sec, desc in zip(mf.sections, devices, strict=False):
            blob = os.pread(mf.fd, sec.data_length, sec.data_offset)
            try:
                decode_section(desc, blob, who=sec.idstr, offset=sec.data_offset)
            except CorruptFile as e:
                assert e.offset is not None
                assert sec.data_offset <= e.offset <= sec.data_offset + len(blob)


@pytest.fixture(scope="module")
def trailer_copy(real_files: dict[str, SavedFile], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, int, dict[str, Any], bytes]:
    """A copy of the mapped-ram file whose trailer each example rewrites in place."""
    src = real_files["mapped"].path
    dst = tmp_path_factory.mktemp("fuzz") / "fuzz.mig"
    with MigrationFile(src) as mf:
        assert mf.vmdesc is not None
        at, doc, raw = mf.vmdesc.offset, copy.deepcopy(mf.vmdesc.doc), mf.vmdesc.raw
    sparse_prefix(src, dst, at)
    return dst, at, doc, raw


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_vmdesc_files_never_crash(trailer_copy: tuple[Path, int, dict[str, Any], bytes],
                                          data: st.DataObject) -> None:
    """Whole files: open, devices(), configuration; only FixedramError may come out."""
    path, at, doc, raw = trailer_copy
    if data.draw(st.booleans()):
        trailer = encode_trailer(_mutate(doc, data))
    else:  # the JSON text itself, byte-level
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.sampled_from(b'{}[]",:0 9'))
        trailer = encode_trailer(bytes(b))
    os.truncate(path, at)
    with open(path, "ab") as f:
        f.write(trailer)
    try:
        with MigrationFile(path) as mf:
            mf.devices()
            decode_configuration(mf)
    except FixedramError:
        pass
