"""Shared pytest fixtures: the real-QEMU guard, the cached guest image, migration-file factories.

Tests marked ``@pytest.mark.qemu`` (or using the ``qemu`` fixture) *fail* when QEMU is missing:
CI must never go green by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make `qemu_harness` importable

from qemu_harness import (
    DEFAULT_FILL_WORDS,
    LinuxArtifacts,
    QemuVM,
    SavedFile,
    default_mem_end,
    load_into_new_vm,
    make_artifacts,
    save_vm,
    write_bootsector,
)
from qemu_harness.guard import require_qemu


def _children() -> set[int]:
    """PIDs of this process's live children (from /proc)."""
    me, out = os.getpid(), set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != b"Z":
                out.add(int(d))
    return out


@pytest.fixture(autouse=True)
def _reap_leaked_children() -> Iterator[None]:
    """A test that fails midway must not leave a guest, receiver or QEMU it started
    running into the next tests (they would compete for the two cores)."""
    before = _children()
    yield
    for pid in _children() - before:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("qemu") is not None:
        require_qemu()


@pytest.fixture(scope="session")
def qemu() -> str:
    """Path of qemu-system-x86_64; fails the test when QEMU is missing or too old."""
    return require_qemu()


@pytest.fixture(scope="session")
def guest_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-images")


@pytest.fixture(scope="session")
def guest_image_factory(guest_image_dir: Path) -> Callable[..., Path]:
    """make(mem_end=..., fill_words=...) -> disk image path, built once per parameter set."""
    cache: dict[tuple[int, int], Path] = {}

    def make(mem_end: int | None = None, fill_words: int = DEFAULT_FILL_WORDS,
             ram_size: int = 128 << 20) -> Path:
        end = mem_end if mem_end is not None else default_mem_end(ram_size)
        key = (end, fill_words)
        if key not in cache:
            cache[key] = write_bootsector(guest_image_dir, mem_end=end, fill_words=fill_words)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def guest_image(guest_image_factory: Callable[..., Path]) -> Path:
    """Default guest for -m 128M: pages of [1 MiB, 64 MiB), 2 dwords each per pass."""
    return guest_image_factory()


@pytest.fixture
def vm_factory(qemu: str, tmp_path: Path, guest_image: Path) -> Iterator[Callable[..., QemuVM]]:
    """make(machine='pc', memory='128M', **QemuVM kwargs) -> launched VM, shut down at teardown."""
    vms: list[QemuVM] = []

    def make(machine: str = "pc", memory: str | int = "128M", **kw: Any) -> QemuVM:
        kw.setdefault("image", guest_image)
        kw.setdefault("name", f"vm{len(vms)}")
        vm = QemuVM(tmp_path, machine=machine, memory=memory, **kw)
        vms.append(vm)
        return vm.launch()

    yield make
    for vm in vms:
        vm.shutdown()


@pytest.fixture
def saved_file(qemu: str, tmp_path: Path, guest_image_factory: Callable[..., Path]
               ) -> Callable[..., SavedFile]:
    """make(machine=..., mode=..., live=..., **save_vm kwargs) -> SavedFile in tmp_path."""
    counter = [0]

    def make(**kw: Any) -> SavedFile:
        ram_size = kw.get("ram_mb", 128) << 20
        kw.setdefault("image", guest_image_factory(kw.get("mem_end"), kw.get("fill_words", 2),
                                                   ram_size=ram_size))
        counter[0] += 1
        kw.setdefault("name", f"src{counter[0]}")
        return save_vm(tmp_path, **kw)

    return make


@pytest.fixture
def loaded_vm(qemu: str, tmp_path: Path, guest_image: Path) -> Iterator[Callable[..., QemuVM]]:
    """load(path, machine, caps, offset=0, **load_into_new_vm kwargs) -> paused loaded VM."""
    vms: list[QemuVM] = []

    def load(path: Path, machine: str, caps: Any = (), offset: int = 0, **kw: Any) -> QemuVM:
        kw.setdefault("workdir", tmp_path)
        kw.setdefault("image", guest_image)
        kw.setdefault("name", f"dst{len(vms)}")
        vm = load_into_new_vm(path, machine, caps, offset, **kw)
        vms.append(vm)
        return vm

    yield load
    for vm in vms:
        vm.shutdown()


@pytest.fixture(scope="session")
def linux_saves(tmp_path_factory: pytest.TempPathFactory) -> LinuxArtifacts:
    """Saves of the booted tests/linux guest (tests/linux/conftest.py says what they hold);
    FIXEDRAM_LINUX_ARTIFACTS=DIR reuses a directory tests/qemu_harness/linux.py made."""
    require_qemu()
    reuse = os.environ.get("FIXEDRAM_LINUX_ARTIFACTS")
    if reuse:
        return LinuxArtifacts.load(reuse)
    return make_artifacts(tmp_path_factory.mktemp("linux-saves"))

