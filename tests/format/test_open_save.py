"""``open_save``: one way to open a save; both readers answer the same, and a page
target sees the same RAM whether the save is read at offsets or in one pass."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixedram import InputError, Save, UsageError, open_save

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]


@pytest.fixture(scope="module")
def live_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A live stream save of the built-in guest: pages re-sent over several passes,
    zero pages among them."""
    path = tmp_path_factory.mktemp("open") / "live.mig"
    subprocess.run([*FIXEDRAM, "save", f"file:{path}", "--ram", "16M", "--live-for", "0.3",
                    "--workload", "random", "--workload-rate", "256M", "--max-bandwidth", "64M"],
                   check=True, capture_output=True, timeout=120)
    return path


class Recorder:
    """A page target that keeps each block's RAM as it ends up."""

    def __init__(self) -> None:
        self.ram: list[np.ndarray] = []
        self.seen = 0

    def begin(self, f: Save) -> None:
        self.ram = [np.zeros((b.npages, b.page_size), dtype=np.uint8) for b in f.blocks]

    def pages(self, bi: int, idx: np.ndarray, data: np.ndarray) -> None:
        self.ram[bi][idx] = data
        self.seen += idx.size

    def zeros(self, bi: int, idx: np.ndarray, had_data: np.ndarray) -> None:
        self.ram[bi][idx] = 0


def _facts(s: Save) -> tuple[object, ...]:
    return (s.format, s.machine, s.capabilities, s.complete, s.passes,
            [(b.idstr, b.used_length, b.pages_present, b.zero_pages) for b in s.blocks],
            [(d.idstr, d.instance_id, d.data_length) for d in s.sections])


def test_a_file_is_random_access_and_a_pipe_one_pass(live_save: Path) -> None:
    with open_save(live_save) as f:
        assert f.random_access and f.compression is None
        facts = _facts(f.walk())
        assert f.passes > 1
    cat = subprocess.Popen(["cat", str(live_save)], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    try:
        with open_save("-", stdin_fd=cat.stdout.fileno()) as p:
            assert not p.random_access
            with pytest.raises(RuntimeError):
                _ = p.summary  # nothing is known before the walk
            assert _facts(p.walk()) == facts
            with pytest.raises(UsageError, match="only once"):
                p.walk()
    finally:
        cat.stdout.close()
        cat.wait()


def test_a_target_sees_the_same_ram_either_way(live_save: Path, tmp_path: Path) -> None:
    gz = tmp_path / "live.mig.gz"
    gz.write_bytes(gzip.compress(live_save.read_bytes(), compresslevel=1))
    rams = []
    for path in (live_save, gz):
        rec = Recorder()
        with open_save(path) as s:
            assert s.random_access == (path == live_save)
            assert s.compression == (None if path == live_save else "gzip")
            s.walk(rec)
            assert s.complete
        rams.append(rec)
    a, b = rams
    assert len(a.ram) == len(b.ram) > 0
    for x, y in zip(a.ram, b.ram, strict=True):
        assert np.array_equal(x, y)
    assert any(x.any() for x in a.ram)
    # At offsets each page is handed over once; in one pass every copy arrives.
    assert 0 < a.seen < b.seen


def test_extract_of_a_file_equals_the_target_walk(live_save: Path, tmp_path: Path) -> None:
    """The walk over a file reads what extract copies (the RAMBlock files)."""
    out = tmp_path / "x"
    subprocess.run([*FIXEDRAM, "extract", str(live_save), "-o", str(out)], check=True,
                   capture_output=True)
    rec = Recorder()
    with open_save(live_save) as s:
        s.walk(rec)
        names = [b.idstr for b in s.blocks]
    for name, ram in zip(names, rec.ram, strict=True):
        assert (out / f"{name}.bin").read_bytes() == ram.tobytes()


def test_a_missing_input_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError) as ei:
        open_save(tmp_path / "nothing.sav")
    assert ei.value.filename == str(tmp_path / "nothing.sav")
    assert isinstance(ei.value, OSError)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(InputError, match="stdin"):
        open_save("-", stdin_fd=r)
