"""Saves inside qcow2 disk images: the VM state of internal snapshots, read in place.

Real QEMU 10 makes the images: the tests/linux guest (Debian kernel, busybox
initramfs, q35) runs with a qcow2 disk; ``savevm`` (HMP) takes one snapshot and
``snapshot-save`` (the QMP job) another, with 3 MiB of disk written in between
through the running VM's block layer (HMP ``qemu-io``), so the image holds
VM state clusters, then disk data clusters, then VM state clusters again. The
ground truth of each snapshot is ``pmemsave`` after ``loadvm TAG`` in a fresh
QEMU (on a copy of the image: the image fixedram reads is never written).

Compressed clusters: ``qemu-img convert -c`` does not copy internal
snapshots, so :func:`forge_qcow2` writes images itself (refcounts included:
``qemu-img check`` finds them clean), and QEMU's own ``loadvm`` of a forged
compressed image is the proof that the forger writes what QEMU reads.
Hostile images are forged ones with one field broken.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zstandard

from fixedram.cli.main import main
from fixedram.errors import CorruptFile, TruncatedFile, UnsupportedFeature, UsageError
from fixedram.io.qcow2 import Qcow2Image
from fixedram.save import open_save
from qemu_harness import LinuxGuest, build_initramfs, guest_files, ram_compare_ranges, ram_split
from qemu_harness.guard import require_qemu
from qemu_harness.vm import QemuVM, file_uri

MIB = 1 << 20
DISK_SIZE = 64 * MIB


# ---- a qcow2 writer for forged images -------------------------------------------------------

def forge_qcow2(path: Path, vm_state: bytes, *, cluster_bits: int = 16, compress: str | None = None,
                version: int = 3, disk_size: int = DISK_SIZE, tag: str = "snap1",
                zero_clusters: bool = True) -> dict[str, int]:
    """Write a qcow2 image with one internal snapshot holding ``vm_state`` and an
    empty disk. ``compress``: None, "zlib" or "zstd" (clusters that do not shrink are
    stored plain, as QEMU does). All-zero clusters get a zero entry (v3) or none (v2).
    Returns where things are: ``snapshot_entry``, ``snapshot_l1``, ``l2`` (first L2 table).
    """
    cs = 1 << cluster_bits
    span = cs * (cs // 8)
    vmoff = -(-disk_size // span) * span
    l1_first, l1_last = vmoff // span, (vmoff + len(vm_state) - 1) // span
    l1_size = l1_last + 1
    l1_clusters = -(-l1_size * 8 // cs)
    refs: dict[int, int] = {}

    def take(n: int = 1) -> int:
        nonlocal next_cluster
        at = next_cluster
        for c in range(at, at + n):
            refs[c] = refs.get(c, 0) + 1
        next_cluster += n
        return at * cs

    next_cluster = 0
    header_at = take()
    active_l1, snap_l1 = take(l1_clusters), take(l1_clusters)
    snap_table = take()
    l2_at = {i: take() for i in range(l1_first, l1_last + 1)}
    out = bytearray(next_cluster * cs)
    l1 = np.zeros(l1_size, dtype=">u8")
    for i, at in l2_at.items():
        l1[i] = at
    out[snap_l1:snap_l1 + l1_size * 8] = l1.tobytes()
    x = 62 - (cluster_bits - 8)
    tail = 0  # bytes used in the compressed-data cluster being filled
    blob = bytearray()  # data written after the tables
    data_base = next_cluster * cs
    l2 = {i: np.zeros(cs // 8, dtype=">u8") for i in l2_at}
    for k in range(-(-len(vm_state) // cs)):
        chunk = vm_state[k * cs:(k + 1) * cs].ljust(cs, b"\0")
        v = vmoff + k * cs
        li, ei = v // span, (v % span) // cs
        if zero_clusters and not any(chunk):
            l2[li][ei] = 1 if version == 3 else 0
            continue
        packed = None
        if compress == "zlib":
            c = zlib.compressobj(6, zlib.DEFLATED, -12)
            packed = c.compress(chunk) + c.flush()
        elif compress == "zstd":
            packed = zstandard.ZstdCompressor(level=3).compress(chunk)
        if packed is not None and len(packed) < cs - 512:
            if tail == 0 or tail + len(packed) > cs:
                blob += bytes(-len(blob) % cs)
                tail = 0
            coff = data_base + len(blob)
            blob += packed
            tail += len(packed)
            nsec = ((coff + len(packed) - 1) >> 9) - (coff >> 9)
            l2[li][ei] = (1 << 62) | (nsec << x) | coff
            for c in range(coff // cs, (coff + len(packed) - 1) // cs + 1):
                refs[c] = refs.get(c, 0) + 1
        else:
            blob += bytes(-len(blob) % cs)
            tail = 0
            at = data_base + len(blob)
            blob += chunk
            refs[at // cs] = refs.get(at // cs, 0) + 1
            l2[li][ei] = at | (1 << 63)
    for i, at in l2_at.items():
        out[at:at + cs] = l2[i].tobytes()
    out += blob
    out += bytes(-len(out) % cs)
    # Refcounts (16-bit entries) after everything, covering themselves too.
    used = len(out) // cs
    per_block = cs // 2
    nb = rt_clusters = 1
    while True:
        total = used + rt_clusters + nb
        need_nb = -(-total // per_block)
        need_rt = -(-need_nb * 8 // cs)
        if (need_nb, need_rt) == (nb, rt_clusters):
            break
        nb, rt_clusters = need_nb, need_rt
    rt_at = used * cs
    for c in range(used, total):
        refs[c] = 1
    counts = np.zeros(nb * per_block, dtype=">u2")
    for c, n in refs.items():
        counts[c] = n
    rt = np.zeros(rt_clusters * cs // 8, dtype=">u8")
    rt[:nb] = (used + rt_clusters + np.arange(nb)) * cs
    out += rt.tobytes() + counts.tobytes()
    # The snapshot table: one entry, extra data as QEMU 10 writes it.
    idb, nameb = b"1", tag.encode()
    extra = struct.pack(">QQQ", len(vm_state), disk_size, (1 << 64) - 1) if version == 3 else b""
    entry = struct.pack(">QIHHIIQII", snap_l1, l1_size, len(idb), len(nameb), int(time.time()),
                        0, 12_345_678_901, len(vm_state) if len(vm_state) < 1 << 32 else 0,
                        len(extra)) + extra + idb + nameb
    out[snap_table:snap_table + len(entry)] = entry
    hlen = 112 if version == 3 else 72
    incompat = 8 if compress == "zstd" else 0
    hdr = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", version, 0, 0, cluster_bits, disk_size, 0,
                      l1_size, active_l1, rt_at, rt_clusters, 1, snap_table)
    if version == 3:
        hdr += struct.pack(">QQQII", incompat, 0, 0, 4, hlen)
        hdr += bytes([1 if compress == "zstd" else 0]) + bytes(7)
    out[header_at:header_at + len(hdr) + 8] = hdr + bytes(8)  # then the end of extensions
    path.write_bytes(out)
    return {"snapshot_entry": snap_table, "snapshot_l1": snap_l1, "l2": l2_at[l1_first],
            "vm_state_offset": vmoff}


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- without QEMU: the reader against forged images -----------------------------------------

def _pattern(n: int, seed: int = 1) -> bytes:
    """Bytes with all-zero clusters, compressible runs and random data."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, n, dtype=np.uint8)
    a[n // 8:n // 4] = 0  # zero clusters
    a[n // 2:3 * n // 4] = np.arange(n // 4, dtype=np.uint64).astype(np.uint8)  # compressible
    return a.tobytes()


@pytest.mark.parametrize(("cluster_bits", "compress", "version"), [
    (9, None, 3), (9, "zlib", 2), (12, "zstd", 3), (16, None, 2), (16, "zlib", 3),
    (21, None, 3), (21, "zstd", 3),
])
def test_reads_equal_the_bytes_forged(tmp_path: Path, cluster_bits: int, compress: str | None,
                                      version: int) -> None:
    data = _pattern(3 * MIB + 777)
    img = tmp_path / "f.qcow2"
    forge_qcow2(img, data, cluster_bits=cluster_bits, compress=compress, version=version)
    with Qcow2Image(img) as q:
        vm = q.vm_state(q.find(None))
        assert vm.size == len(data)
        assert vm.pread(len(data), 0) == data
        rng = np.random.default_rng(7)
        for _ in range(200):
            off = int(rng.integers(0, len(data)))
            n = int(rng.integers(0, min(len(data) - off, 300_000) + 1))
            assert vm.pread(n, off) == data[off:off + n], (off, n)
        buf = bytearray(5000)
        assert vm.preadv([memoryview(buf)[:2000], memoryview(buf)[2000:]], len(data) - 3000) == 3000
        assert bytes(buf[:3000]) == data[-3000:]
        with pytest.raises(TruncatedFile) as e:
            vm.pread(10, len(data) - 5)
        assert e.value.path == f"{img} (snapshot snap1)" and e.value.offset == len(data) - 5


def test_contiguous_clusters_are_read_in_few_calls(tmp_path: Path) -> None:
    data = _pattern(8 * MIB)
    img = tmp_path / "f.qcow2"
    forge_qcow2(img, data, cluster_bits=16, zero_clusters=False)
    with Qcow2Image(img) as q:
        vm = q.vm_state(q.find("snap1"))
        before = vm.image_reads
        assert vm.pread(len(data), 0) == data
        # 128 clusters, all contiguous: the L2 table and one read of the data.
        assert vm.image_reads - before <= 2


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fixedram: error: ")
    return lines[0]


def test_hostile_l1_offset_past_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "h.qcow2"
    where = forge_qcow2(img, _pattern(MIB))
    _patch(img, where["snapshot_entry"], ">Q", 1 << 40)
    rc, _out, err = _cli(capsys, "extract", str(img), "-o", str(tmp_path / "x"),
                         "--format", "physical")
    line = _one_error_line(err)
    # A malformed image exits 2 (a malformed save), never 1 (could not read).
    assert rc == 2 and "L1 table" in line and f"(at byte offset {where['snapshot_entry']})" in line


def test_hostile_snapshot_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "h.qcow2"
    forge_qcow2(img, _pattern(MIB))
    _patch(img, 60, ">I", 65536)  # far more entries than the image holds
    rc, _out, err = _cli(capsys, "inspect", str(img))
    line = _one_error_line(err)
    assert rc == 2 and "65536 snapshot table entries" in line and "(at byte offset 60)" in line
    _patch(img, 60, ">I", 2)  # the second entry is the zeros after the first
    with pytest.raises(CorruptFile, match="entry 1 of 2 has an empty id") as e:
        Qcow2Image(img)
    assert e.value.offset is not None and e.value.offset > 0


def test_hostile_l2_entry_past_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "h.qcow2"
    where = forge_qcow2(img, _pattern(MIB), zero_clusters=False)
    _patch(img, where["l2"] + 8 * 3, ">Q", (1 << 63) | (1 << 45))  # cluster 3 of the VM state
    rc, _out, err = _cli(capsys, "inspect", str(img), "--snapshot", "snap1")
    line = _one_error_line(err)
    assert rc == 2 and "past the end" in line
    assert f"(at byte offset {where['l2'] + 24})" in line


def test_encrypted_and_unknown_features_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "h.qcow2"
    forge_qcow2(img, _pattern(MIB))
    _patch(img, 32, ">I", 2)  # LUKS
    rc, out, _err = _cli(capsys, "inspect", str(img))  # the table is readable: listed
    assert rc == 0 and "snap1" in out
    rc, _out, err = _cli(capsys, "extract", str(img), "-o", str(tmp_path / "x"))
    line = _one_error_line(err)
    assert rc == 1 and "encrypted (LUKS)" in line and "(at byte offset 32)" in line
    _patch(img, 32, ">I", 0)
    _patch(img, 72, ">Q", 1 << 9)
    with pytest.raises(UnsupportedFeature, match="incompatible feature bits 0x200"):
        open_save(img)


def test_snapshot_option_refused_elsewhere_and_choice_needed(tmp_path: Path) -> None:
    img = tmp_path / "f.qcow2"
    forge_qcow2(img, _pattern(MIB), disk_size=DISK_SIZE)
    with pytest.raises(UsageError, match="no snapshot with id or tag 'nope'"):
        open_save(img, snapshot="nope")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"QEVM\0\0\0\3")
    with pytest.raises(UsageError, match="not a qcow2 image"):
        open_save(plain, snapshot="snap1")
    empty = tmp_path / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img), "-F", "qcow2",
                    str(empty)], check=True)
    with pytest.raises(UsageError, match=r"no internal snapshots.*backing files never do"):
        open_save(empty)


# ---- real QEMU 10 -----------------------------------------------------------------------------

@dataclass
class Snapped:
    image: Path
    tags: list[str]
    pmem: dict[str, Path]  # pmemsave of RAM below 4 GiB after loadvm TAG in a fresh QEMU
    ranges: list[tuple[int, int]]
    low: int
    kernel: Path
    initrd: Path


def _drive(img: Path) -> list[str]:
    return ["-drive", f"file={img},format=qcow2,if=virtio,id=drive0,node-name=disk0"]


def _hmp(vm: QemuVM, cmd: str) -> str:
    out = str(vm.qmp("human-monitor-command", command_line=cmd))
    assert "rror" not in out, f"{cmd}: {out}"
    return out


def _snapshot_save_job(vm: QemuVM, tag: str) -> None:
    vm.qmp("snapshot-save", **{"job-id": f"save-{tag}", "tag": tag, "vmstate": "disk0",
                               "devices": ["disk0"]})
    deadline = time.monotonic() + 120
    while True:
        jobs = {j["id"]: j for j in vm.qmp("query-jobs")}
        job = jobs[f"save-{tag}"]
        if job["status"] == "concluded":
            assert "error" not in job, job
            vm.qmp("job-dismiss", id=f"save-{tag}")
            return
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def _loadvm_pmem(work: Path, img: Path, tag: str, kernel: Path, initrd: Path, low: int) -> Path:
    """pmemsave after ``loadvm TAG`` in a fresh QEMU, on a copy of the image."""
    copy = work / f"loadvm-{img.stem}-{tag}.qcow2"
    shutil.copyfile(img, copy)
    pmem = work / f"pmem-{img.stem}-{tag}.bin"
    with LinuxGuest(work, kernel, initrd, name=f"load-{img.stem}-{tag}", paused=True,
                    extra_args=_drive(copy)) as vm:
        _hmp(vm, f"loadvm {tag}")
        vm.pmemsave(0, low, pmem)
    copy.unlink()
    return pmem


def _make(work: Path, name: str, create_opts: str) -> Snapped:
    require_qemu()
    vmlinuz, busybox, _fw = guest_files()
    initrd = build_initramfs(busybox, work / "initramfs.cpio")
    img = work / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", create_opts, str(img),
                    str(DISK_SIZE)], check=True)
    with LinuxGuest(work, vmlinuz, initrd, name=name, extra_args=_drive(img)) as vm:
        vm.wait_ready()
        vm.wait_ticks(1)
        _hmp(vm, "savevm snap1")
        # Disk data written between the snapshots, through the VM's block layer.
        _hmp(vm, 'qemu-io drive0 "write -P 0xab 0 3M"')
        vm.wait_ticks(1)
        _snapshot_save_job(vm, "snap2")
        low, _ = ram_split(vm.ram_size, vm.machine_name())
        ranges = ram_compare_ranges(vm.ram_size, vm.machine_name())
    tags = ["snap1", "snap2"]
    pmem = {t: _loadvm_pmem(work, img, t, vmlinuz, initrd, low) for t in tags}
    return Snapped(img, tags, pmem, [(a, b) for a, b in ranges if a < low], low, vmlinuz, initrd)


@pytest.fixture(scope="module")
def snapped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Snapped]:
    work = tmp_path_factory.mktemp("qcow2")
    return {"64k": _make(work, "c64k", "cluster_size=64k"),
            "2m-extl2": _make(work, "c2m", "cluster_size=2M,extended_l2=on,"
                              "compression_type=zstd")}


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _same_ram(extracted: Path, pmem: Path, ranges: list[tuple[int, int]]) -> None:
    a = np.memmap(extracted, dtype=np.uint8, mode="r")
    b = np.memmap(pmem, dtype=np.uint8, mode="r")
    for lo, hi in ranges:
        hi = min(hi, b.size)
        diff = np.flatnonzero(a[lo:hi] != b[lo:hi])
        assert diff.size == 0, f"{diff.size} bytes differ in [{lo:#x}, {hi:#x}), first at " \
                               f"{lo + int(diff[0]):#x}"


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["64k", "2m-extl2"])
def test_list_as_qemu_img(snapped: dict[str, Snapped], kind: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    s = snapped[kind]
    rc, out, _ = _cli(capsys, "inspect", str(s.image))
    assert rc == 0
    ours = out.splitlines()[1:]
    theirs = subprocess.run(["qemu-img", "snapshot", "-l", str(s.image)], capture_output=True,
                            text=True, check=True).stdout.splitlines()[1:]
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a.startswith(b), (a, b)  # qemu-img's columns, then the SAVE column
        assert a.endswith(("SAVE", "VM state"))
    rc, out, _ = _cli(capsys, "inspect", str(s.image), "--json")
    doc = json.loads(out)
    assert [x["tag"] for x in doc["snapshots"]] == s.tags
    first = doc["snapshots"][0]
    assert {"id", "tag", "vm_state_size", "date", "vm_clock_ns", "icount"} <= first.keys()
    assert first["vm_state_size"] > 10 * MIB and first["has_vm_state"]
    assert doc["extended_l2"] is (kind == "2m-extl2")


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["64k", "2m-extl2"])
@pytest.mark.parametrize("tag", ["snap1", "snap2"])
def test_extract_equals_loadvm_pmemsave(snapped: dict[str, Snapped], kind: str, tag: str,
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    s = snapped[kind]
    before = _digest(s.image)
    out = tmp_path / "ram.img"
    rc, _o, err = _cli(capsys, "extract", str(s.image), "--snapshot", tag, "--format",
                       "physical", "-o", str(out))
    assert rc == 0, err
    _same_ram(out, s.pmem[tag], s.ranges)
    # The two snapshots differ (the guest ran between them), so the right one was read.
    other = s.pmem["snap2" if tag == "snap1" else "snap1"]
    assert out.read_bytes()[:s.low] != other.read_bytes()
    rc, _o, err = _cli(capsys, "verify", str(s.image), "--snapshot", tag)
    assert rc == 0, err
    assert _digest(s.image) == before  # read-only


@pytest.mark.qemu
def test_layout_and_refusals_on_real_images(snapped: dict[str, Snapped],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    s = snapped["64k"]
    with Qcow2Image(s.image) as q:
        assert q.cluster_size == 64 << 10 and not q.extended_l2
        ranges = []
        for snap in q.snapshots:
            vm = q.vm_state(snap)
            assert vm.start == 512 * MIB  # the first L1 slot past the 64 MiB disk
            assert vm.pread(8, 0) == b"QEVM\0\0\0\3"
            t = vm._table(vm.start >> 29)
            assert t is not None
            used = t.host[t.kind == 1]
            ranges.append((int(used.min()), int(used.max())))
            n0 = vm.image_reads
            vm.pread(vm.size, 0)
            assert vm.image_reads - n0 <= 8  # ~80 MiB in a handful of reads
        # snap2's VM state lies after the disk data written after snap1's.
        assert ranges[0][1] < ranges[1][0]
        written = subprocess.run(["qemu-img", "map", "--output=json", str(s.image)],
                                 capture_output=True, text=True, check=True).stdout
        data = [e for e in json.loads(written) if e["data"]]
        assert data and ranges[0][1] < data[0]["offset"] < ranges[1][0]
    rc, _o, err = _cli(capsys, "extract", str(s.image), "-o", "/nonexistent/x")
    line = _one_error_line(err)
    assert rc == 1 and "2 snapshots hold VM state" in line and "1 (snap1), 2 (snap2)" in line
    x = snapped["2m-extl2"]
    with Qcow2Image(x.image) as q:
        assert q.extended_l2 and q.compression_type == 1 and q.cluster_size == 2 * MIB
        assert q.vm_state(q.snapshots[0]).start == 256 << 30  # one L1 slot: 256 GiB


@pytest.mark.qemu
def test_convert_loads_in_qemu(snapped: dict[str, Snapped], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    s = snapped["64k"]
    out = tmp_path / "out.mig"
    rc, _o, err = _cli(capsys, "convert", str(s.image), "--snapshot", "snap2", str(out),
                       "--to", "mapped-ram")
    assert rc == 0, err
    pmem = tmp_path / "loaded.bin"
    disk = tmp_path / "disk.qcow2"  # the saved VM has a virtio disk: so must this one
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(DISK_SIZE)],
                   check=True)
    with LinuxGuest(tmp_path, s.kernel, s.initrd, name="incoming", incoming=True,
                    paused=True, extra_args=_drive(disk)) as vm:
        vm.set_caps(**{"mapped-ram": True})
        vm.migrate_incoming(file_uri(out))
        vm.pmemsave(0, s.low, pmem)
    _same_ram(pmem, s.pmem["snap2"], s.ranges)


@pytest.mark.qemu
@pytest.mark.parametrize("compress", ["zlib", "zstd"])
def test_compressed_clusters(snapped: dict[str, Snapped], compress: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    s = snapped["64k"]
    with Qcow2Image(s.image) as q:
        vm = q.vm_state(q.find("snap1"))
        state = vm.pread(vm.size, 0)
    img = tmp_path / f"{compress}.qcow2"
    forge_qcow2(img, state, compress=compress)
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with Qcow2Image(img) as q:
        vm = q.vm_state(q.find(None))
        assert vm.pread(vm.size, 0) == state
        t = vm._table(vm.start >> 29)
        assert t is not None and np.count_nonzero(t.kind == 2) > 100  # compressed clusters
    out = tmp_path / "ram.img"
    rc, _o, err = _cli(capsys, "extract", str(img), "--format", "physical", "-o", str(out))
    assert rc == 0, err
    _same_ram(out, s.pmem["snap1"], s.ranges)
    if compress == "zlib":  # QEMU itself reads the forged image alike
        pmem = _loadvm_pmem(tmp_path, img, "snap1", s.kernel, s.initrd, s.low)
        _same_ram(pmem, s.pmem["snap1"], s.ranges)


def test_forged_image_passes_qemu_img_check(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img not installed")
    for compress in (None, "zlib", "zstd"):
        img = tmp_path / f"{compress}.qcow2"
        forge_qcow2(img, _pattern(2 * MIB), compress=compress)
        r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        listed = subprocess.run(["qemu-img", "snapshot", "-l", str(img)], capture_output=True,
                                text=True, check=True).stdout
        assert "snap1" in listed and "2 MiB" in listed
        assert os.path.getsize(img) > 0
