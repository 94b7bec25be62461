"""Tests of the real-QEMU harness itself: guest, VM wrapper, save/load helpers (no mocks)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from qemu_harness import (
    OFFSET_FILL,
    GuestParams,
    MigrationFailed,
    QemuVM,
    SavedFile,
    build_bootsector,
    check_guest_pattern,
    diff_pages,
    gpa_to_ram_offset,
    guard,
    load_error,
    ram_compare_ranges,
    read_params,
)
from qemu_harness.guest import PARAMS_OFFSET

MIB = 1 << 20
RAM = 128 * MIB
MACHINES = ["pc", "q35"]


def _pmem(vm: QemuVM, path: Path, size: int = RAM) -> bytes:
    return vm.pmemsave(0, size, path).read_bytes()


# ---- pure checks (no QEMU) ------------------------------------------------------------------
def test_bootsector_layout() -> None:
    img = build_bootsector(mem_end=64 * MIB, fill_words=1024)
    assert len(img) == 512 and img[510:] == b"\x55\xaa"
    assert read_params(img) == GuestParams(mem_start=MIB, mem_end=64 * MIB, fill_words=1024)
    assert struct.unpack_from("<I", img, PARAMS_OFFSET + 4)[0] == 64 * MIB
    # Only the parameter block differs between builds.
    other = build_bootsector(mem_end=32 * MIB)
    diff = [i for i in range(512) if img[i] != other[i]]
    assert all(PARAMS_OFFSET <= i < PARAMS_OFFSET + 12 for i in diff)
    with pytest.raises(ValueError):
        build_bootsector(mem_end=64 * MIB + 1)


def test_ram_compare_ranges() -> None:
    assert ram_compare_ranges(RAM, "pc") == [(0, 0xA0000), (0x100000, RAM)]
    assert ram_compare_ranges(RAM, "pc-q35-10.0") == [(0, 0xA0000), (0x100000, RAM)]
    gib = 1 << 30
    # Below 2.75 GiB (q35) / 3.5 GiB (pc) all RAM is below 4 GiB.
    assert ram_compare_ranges(2 * gib, "q35")[-1] == (0x100000, 2 * gib)
    assert ram_compare_ranges(3 * gib, "pc")[-1] == (0x100000, 3 * gib)
    assert ram_compare_ranges(4 * gib, "q35")[-2:] == [(0x100000, 2 * gib), (4 * gib, 6 * gib)]
    assert ram_compare_ranges(4 * gib, "pc-i440fx-10.0")[-1] == (4 * gib, 5 * gib)
    assert gpa_to_ram_offset(4 * gib + 5, 4 * gib, "q35") == 2 * gib + 5


def test_missing_qemu_fails_not_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "qemu_binary", lambda: None)
    assert "not found" in (guard._qemu_problem() or "")
    monkeypatch.setattr(guard, "_problem", ["qemu-system-x86_64 not found"])
    with pytest.raises(pytest.fail.Exception):
        guard.require_qemu()


# ---- the guest on real QEMU -------------------------------------------------------------------
@pytest.mark.qemu
@pytest.mark.parametrize("machine", MACHINES)
def test_guest_boots_and_dirties_pages(machine: str, vm_factory: Callable[..., QemuVM],
                                       tmp_path: Path) -> None:
    vm = vm_factory(machine)
    assert vm.wait_for_progress(3, timeout=30) >= 3
    assert vm.serial_text().startswith("S")
    assert vm.machine_name().startswith("pc-q35-" if machine == "q35" else "pc-i440fx-")
    vm.stop()
    assert vm.status() == "paused"
    ram = _pmem(vm, tmp_path / "ram")
    res = check_guest_pattern(ram, GuestParams(mem_end=64 * MIB))
    assert res.ok, res.errors
    assert res.max_pass >= 3
    # Stopped means stopped: nothing changes any more.
    assert diff_pages(ram, _pmem(vm, tmp_path / "ram2"), ram_compare_ranges(RAM, machine)) == []


@pytest.mark.qemu
def test_guest_full_page_fill(vm_factory: Callable[..., QemuVM],
                              guest_image_factory: Callable[..., Path], tmp_path: Path) -> None:
    params = GuestParams(mem_end=16 * MIB, fill_words=1024)
    vm = vm_factory("q35", image=guest_image_factory(params.mem_end, params.fill_words))
    vm.wait_for_progress(2, timeout=30)
    vm.stop()
    res = check_guest_pattern(_pmem(vm, tmp_path / "ram"), params)
    assert res.ok, res.errors


# ---- saves and loads --------------------------------------------------------------------------
def _check_roundtrip(saved: SavedFile, load: Callable[..., QemuVM], tmp_path: Path) -> None:
    src = saved.pmem_path.read_bytes()
    res = check_guest_pattern(src, saved.guest)
    assert res.ok, res.errors
    vm = load(saved.path, saved.machine_alias, saved.caps, saved.offset)
    assert vm.status() in ("paused", "inmigrate", "postmigrate")
    assert vm.query_migrate()["status"] == "completed"
    dst = _pmem(vm, tmp_path / f"{saved.path.name}.dst", len(src))
    assert diff_pages(src, dst, saved.compare_ranges) == []
    vm.cont()
    before = vm.progress_count()
    assert vm.wait_for_progress(before + 2, timeout=30) >= before + 2
    vm.stop()
    res2 = check_guest_pattern(_pmem(vm, tmp_path / "after"), saved.guest)
    assert res2.ok, res2.errors
    assert res2.max_pass > res.max_pass  # the guest carried on from the loaded state


@pytest.mark.qemu
@pytest.mark.parametrize("machine", MACHINES)
def test_paused_mapped_ram_save_and_load(machine: str, saved_file: Callable[..., SavedFile],
                                         loaded_vm: Callable[..., QemuVM],
                                         tmp_path: Path) -> None:
    saved = saved_file(machine=machine, mode="mapped-ram", live=False, offset=4096)
    assert saved.machine.startswith("pc-q35-" if machine == "q35" else "pc-i440fx-")
    head = saved.path.read_bytes()[:4100]
    assert head[:4096] == OFFSET_FILL * 4096 and head[4096:4100] == b"QEVM"
    _check_roundtrip(saved, loaded_vm, tmp_path)


@pytest.mark.qemu
def test_paused_mapped_ram_multifd_save_and_load(saved_file: Callable[..., SavedFile],
                                                 loaded_vm: Callable[..., QemuVM],
                                                 tmp_path: Path) -> None:
    saved = saved_file(machine="q35", mode="mapped-ram-multifd", live=False, channels=4)
    assert saved.path.read_bytes()[:4] == b"QEVM"
    _check_roundtrip(saved, loaded_vm, tmp_path)


@pytest.mark.qemu
def test_live_stream_save_is_multi_pass(saved_file: Callable[..., SavedFile],
                                        loaded_vm: Callable[..., QemuVM],
                                        tmp_path: Path) -> None:
    saved = saved_file(machine="pc", mode="stream", live=True)
    ram = saved.stats["ram"]
    assert ram["dirty-sync-count"] >= 3
    assert ram["transferred"] > 2 * saved.ram_size
    _check_roundtrip(saved, loaded_vm, tmp_path)


@pytest.mark.qemu
def test_load_failure_reports_qemu_message(saved_file: Callable[..., SavedFile],
                                           loaded_vm: Callable[..., QemuVM]) -> None:
    saved = saved_file(machine="pc", mode="mapped-ram", live=False)
    expected = "Capability mapped-ram is off, but received capability is on"
    with pytest.raises(MigrationFailed) as ei:
        loaded_vm(saved.path, "pc", {})
    assert expected in ei.value.log
    # Without check, the VM stays alive with status 'failed' for inspection.
    vm = loaded_vm(saved.path, "pc", {}, check=False)
    assert vm.query_migrate()["status"] == "failed"
    assert expected in load_error(vm)
