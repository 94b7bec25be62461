"""Converted files load into real QEMU 10: RAM equals the source, the guest continues."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fixedram.format.migfile import MigrationFile
from fixedram.tools.convert import convert_file
from qemu_harness import (
    QemuVM,
    SavedFile,
    diff_pages,
    file_uri,
    load_error,
    load_into_new_vm,
    ram_compare_ranges,
    save_vm,
)

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@pytest.fixture(scope="module")
def live_stream(tmp_path_factory: pytest.TempPathFactory, qemu: str,
                guest_image_factory: Callable[..., Path]) -> SavedFile:
    """A live, multi-pass stream: the guest re-dirtied RAM while QEMU sent it."""
    d = tmp_path_factory.mktemp("live-stream")
    return save_vm(d, machine="q35", mode="stream", live=True, image=guest_image_factory(),
                   min_transferred=3 * (128 << 20))


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory, qemu: str,
           guest_image_factory: Callable[..., Path]) -> SavedFile:
    d = tmp_path_factory.mktemp("mapped")
    return save_vm(d, machine="pc", mode="mapped-ram", live=True, image=guest_image_factory())


def _check_loaded(sf: SavedFile, path: Path, caps: dict[str, bool], tmp_path: Path,
                  guest_image: Path) -> None:
    vm = load_into_new_vm(path, sf.machine, caps, workdir=tmp_path, image=guest_image,
                          ram_size=sf.ram_size, name="dst")
    try:
        pm = vm.pmemsave(0, sf.ram_size, tmp_path / "dst.pmem")
        bad = diff_pages(sf.pmem_path.read_bytes(), pm.read_bytes(), sf.compare_ranges)
        assert not bad, f"{len(bad)} pages differ after load, first 0x{bad[0]:x}"
        before = vm.progress_count()
        vm.cont()
        assert vm.wait_for_progress(before + 2, timeout=30) >= before + 2
    finally:
        vm.shutdown()


def test_live_stream_to_mapped_ram_loads(live_stream: SavedFile, tmp_path: Path,
                                         guest_image: Path) -> None:
    src = live_stream
    assert src.stats["ram"]["transferred"] > 2 * src.ram_size
    out = tmp_path / "conv.mig"
    convert_file(str(src.path), str(out), "mapped-ram")
    with MigrationFile(out) as mf, MigrationFile(src.path) as orig:
        assert mf.format == "mapped-ram" and mf.complete
        assert orig.passes >= 2
        dev_bytes = sum(d.end - d.offset for d in orig.sections)
        bound = (sum(b.used_length for b in mf.blocks) + len(mf.blocks) * MiB + dev_bytes
                 + (mf.summary.vmdesc.end - mf.summary.vmdesc.offset if mf.summary.vmdesc
                    else 0) + 4096)
        assert mf.size <= bound
        assert src.path.stat().st_size > mf.allocated_bytes()
    _check_loaded(src, out, {"mapped-ram": True}, tmp_path, guest_image)


def test_mapped_ram_to_stream_loads(mapped: SavedFile, tmp_path: Path,
                                    guest_image: Path) -> None:
    out = tmp_path / "conv.stream"
    convert_file(str(mapped.path), str(out), "stream")
    with MigrationFile(out) as mf:
        assert mf.format == "stream" and mf.complete and mf.passes == 1
    _check_loaded(mapped, out, {}, tmp_path, guest_image)


def test_stream_via_exec_into_qemu(mapped: SavedFile, tmp_path: Path,
                                   guest_image: Path) -> None:
    """`migrate-incoming "exec:fixedram convert IN - --to stream"` on a QEMU without
    mapped-ram."""
    cmd = shlex.join([sys.executable, "-m", "fixedram.cli.main", "convert", str(mapped.path),
                      "-", "--to", "stream"])
    from qemu_harness import QemuVM

    vm = QemuVM(tmp_path, image=guest_image, machine=mapped.machine, memory=mapped.ram_size,
                incoming=True, paused=True, name="exec-dst").launch()
    try:
        vm.migrate_incoming(f"exec:{cmd}")
        pm = vm.pmemsave(0, mapped.ram_size, tmp_path / "exec.pmem")
        assert not diff_pages(mapped.pmem_path.read_bytes(), pm.read_bytes(),
                              mapped.compare_ranges)
        before = vm.progress_count()
        vm.cont()
        vm.wait_for_progress(before + 2, timeout=30)
    finally:
        vm.shutdown()


@pytest.mark.parametrize("to,dst_caps,message", [
    ("mapped-ram", {}, "Capability mapped-ram is off, but received capability is on"),
    ("stream", {"mapped-ram": True},
     "Capability mapped-ram is on, but received capability is off"),
])
def test_capability_mismatch_is_qemus_own(mapped: SavedFile, tmp_path: Path, guest_image: Path,
                                          to: str, dst_caps: dict[str, bool],
                                          message: str) -> None:
    """Our files carry the capability exactly: QEMU refuses them on the wrong side."""
    out = tmp_path / f"conv-{to}"
    convert_file(str(mapped.path), str(out), to)
    vm = load_into_new_vm(out, mapped.machine, dst_caps, workdir=tmp_path, image=guest_image,
                          ram_size=mapped.ram_size, check=False, name="mismatch")
    try:
        assert message in load_error(vm)
    finally:
        vm.shutdown()


def test_convert_cli_offset_and_force(mapped: SavedFile, tmp_path: Path,
                                      guest_image: Path) -> None:
    out = tmp_path / "off.mig"
    run = [sys.executable, "-m", "fixedram.cli.main", "convert", str(mapped.path), str(out),
           "--to", "mapped-ram", "--offset", "64k"]
    subprocess.run(run, check=True)
    r = subprocess.run(run, capture_output=True, text=True)
    assert r.returncode == 1 and "already exists" in r.stderr and "Traceback" not in r.stderr
    subprocess.run([*run, "--force"], check=True)
    with MigrationFile(out) as mf:
        assert mf.start == 65536
    vm = load_into_new_vm(out, mapped.machine, {"mapped-ram": True}, offset=65536,
                          workdir=tmp_path, image=guest_image, ram_size=mapped.ram_size)
    try:
        pm = vm.pmemsave(0, mapped.ram_size, tmp_path / "off.pmem")
        assert not diff_pages(mapped.pmem_path.read_bytes(), pm.read_bytes(),
                              mapped.compare_ranges)
    finally:
        vm.shutdown()


def test_ignore_shared_to_stream_loads(qemu: str, tmp_path: Path, guest_image: Path) -> None:
    """QEMU 10's own x-ignore-shared save, converted --to stream, loads into QEMU 10
    with the same guest RAM. Guest RAM lives in the shared backend file and is not
    in the stream, so the destination maps that file too (share=off works as
    well; plain RAM fails: QEMU names the block after the backend)."""
    ram = tmp_path / "guest.ram"
    ranges = ram_compare_ranges(128 * MiB, "q35")

    def backend(share: str) -> list[str]:
        return ["-object", f"memory-backend-file,id=m0,size=128M,mem-path={ram},share={share}",
                "-machine", "memory-backend=m0"]

    def pmem(vm: QemuVM, tag: str) -> bytes:
        return b"".join(vm.pmemsave(a, n, tmp_path / f"{tag}-{a:x}.pmem").read_bytes()
                        for a, n in ranges)

    with QemuVM(tmp_path, guest_image, machine="q35", name="src",
                extra_args=backend("on")).launch() as src:
        src.wait_for_progress(2)
        src.stop()
        src.set_caps(**{"x-ignore-shared": True})
        src.migrate(file_uri(tmp_path / "is.mig"))
        want = pmem(src, "src")
    out = tmp_path / "conv.mig"
    convert_file(str(tmp_path / "is.mig"), str(out), "stream")
    with MigrationFile(out) as mf, MigrationFile(tmp_path / "is.mig") as orig:
        assert mf.capabilities == ["x-ignore-shared"]
        assert [(b.idstr, b.record.gpa) for b in mf.blocks] == [
            (b.idstr, b.record.gpa) for b in orig.blocks]
    for share in ("on", "off"):
        with QemuVM(tmp_path, None, machine="q35", name=f"dst-{share}", incoming=True,
                    extra_args=backend(share)).launch() as dst:
            dst.set_caps(**{"x-ignore-shared": True})
            info = dst.migrate_incoming(file_uri(out))
            assert info["status"] == "completed", info
            assert pmem(dst, f"dst-{share}") == want
