"""Truncated and mutated real QEMU files: always a typed error, never another exception."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixedram.errors import FormatError
from fixedram.format.migfile import MigrationFile
from fixedram.tools.verify import open_checked
from qemu_harness import SavedFile, save_vm
from util import sparse_prefix

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory, qemu: str,
               guest_image_factory: Callable[..., Path]) -> dict[str, SavedFile]:
    d = tmp_path_factory.mktemp("corrupt")
    # A small dirtied region keeps each truncated copy cheap.
    img = guest_image_factory(mem_end=4 << 20)
    return {
        "stream": save_vm(d, machine="q35", mode="stream", live=False, image=img,
                          name="stream"),
        "mapped": save_vm(d, machine="pc", mode="mapped-ram", live=False, image=img,
                          name="mapped"),
    }


def _cut_points(path: Path) -> list[int]:
    with MigrationFile(path) as mf:
        pts = set()
        for b in mf.summary.boundaries:
            pts.update((b, b + 1, b + 5))
        for blk in mf.blocks:
            rec = blk.record
            pts.update((rec.record_offset + 1, rec.record_offset + 3))
            if rec.mapped is not None:
                m = rec.mapped
                pts.update((m.offset + 10, m.bitmap_offset + 3, m.pages_offset + 4096,
                            m.pages_offset + blk.used_length - 1))
        for dev in mf.sections:
            pts.update((dev.data_offset + dev.data_length // 2, dev.end - 2))
        eof = mf.summary.eof_offset
        assert eof is not None
        pts.update((eof, eof + 1, eof + 3, mf.size - 1, mf.size // 2))
        pts.update(range(0, 64, 3))
        return sorted(p for p in pts if 0 < p < mf.size)


@pytest.mark.parametrize("kind", ["stream", "mapped"])
def test_truncated_everywhere(real_files: dict[str, SavedFile], kind: str,
                              tmp_path: Path) -> None:
    src = real_files[kind].path
    cut = tmp_path / "cut.mig"
    points = _cut_points(src)
    assert len(points) > 60
    eof_seen = 0
    for n in points:
        sparse_prefix(src, cut, n)
        try:
            with MigrationFile(cut) as mf:
                # Only a cut inside the optional vmdesc trailer can still parse: the
                # stream itself (up to EOF) is whole then.
                assert mf.summary.eof_offset is not None and n > mf.summary.eof_offset
                eof_seen += 1
        except FormatError as e:
            assert e.path == str(cut)
            assert e.offset is not None and 0 <= e.offset <= n
        # Lenient open for inspect/verify: a typed error or an incomplete file.
        mf2, problems = open_checked(str(cut))
        if mf2 is not None:
            with mf2:
                if n <= (mf2.summary.eof_offset or n):
                    assert not mf2.complete and problems
    assert eof_seen <= 3


def _mutate_and_open(src: Path, dst: Path, edits: list[tuple[int, bytes]]) -> None:
    """Copy ``src`` (keeping holes), apply ``edits``, open and walk every block:
    the only exception allowed is a FormatError."""
    sparse_prefix(src, dst, src.stat().st_size)
    with open(dst, "r+b") as f:
        for pos, data in edits:
            f.seek(pos)
            f.write(data)
    try:
        with MigrationFile(dst, strict=False) as mf:
            for b in mf.blocks:
                b.present()
                list(b.runs())
    except FormatError:
        pass


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_stream(real_files: dict[str, SavedFile], tmp_path: Path,
                        data: st.DataObject) -> None:
    src = real_files["stream"].path
    size = src.stat().st_size
    with MigrationFile(src) as mf:
        hot = [b for b in mf.summary.boundaries] + [blk.record.record_offset
                                                    for blk in mf.blocks]
    edits = data.draw(st.lists(st.tuples(
        st.one_of(st.integers(0, size - 1), st.sampled_from(hot).flatmap(
            lambda p: st.integers(max(0, p - 2), min(size - 1, p + 12)))),
        st.binary(min_size=1, max_size=8)), min_size=1, max_size=6))
    _mutate_and_open(src, tmp_path / "m.mig", edits)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_mapped_ram_headers(real_files: dict[str, SavedFile], tmp_path: Path,
                                    data: st.DataObject) -> None:
    src = real_files["mapped"].path
    with MigrationFile(src) as mf:
        hot = [blk.record.mapped.offset for blk in mf.blocks if blk.record.mapped] + \
              [blk.record.record_offset for blk in mf.blocks] + mf.summary.boundaries
    edits = data.draw(st.lists(st.tuples(
        st.sampled_from(hot).flatmap(lambda p: st.integers(max(0, p - 2), p + 30)),
        st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
    _mutate_and_open(src, tmp_path / "m.mig", edits)
