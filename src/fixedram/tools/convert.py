"""``fixedram convert``: stream <-> mapped-ram, pages moved in coalesced runs.

A multi-pass stream becomes a bounded, sparse mapped-ram file (only the last
copy of each page is kept); a mapped-ram file becomes a single-pass stream
that any QEMU can load with mapped-ram off. Device sections are copied
verbatim and the vmdesc trailer is rewritten for the output's configuration
(see :class:`~fixedram.format.machine.MachineState`), so the result restores
the same VM and describes itself truthfully.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from ..errors import OutputError, UnsupportedFeature
from ..format.machine import MachineState
from ..format.migfile import MigrationFile
from ..format.writer import BlockSpec, MappedRamWriter, StreamWriter
from ..memory.copy import RUN_PAGES, RunCopier
from ..output import AtomicOutput, BackgroundWriter, output_error

__all__ = ["convert_file", "to_mapped_ram", "to_stream"]

Progress = Callable[[int], None]


def _require_complete(mf: MigrationFile) -> None:
    if not mf.complete:
        raise UnsupportedFeature("the input save is incomplete (no EOF marker, or an unfinished "
                                 "libvirt image); refusing to convert it", path=mf.path,
                                 offset=mf.size)


def to_mapped_ram(mf: MigrationFile, fd: int, *, start: int = 0,
                  progress: Progress | None = None) -> int:
    """Write ``mf`` as a mapped-ram file on ``fd`` from ``start``; return its end."""
    _require_complete(mf)
    state = MachineState.from_file(mf).with_mapped_ram(True)
    w = MappedRamWriter(fd, state, BlockSpec.of(mf.blocks), start=start, fresh=True)
    copier = RunCopier(mf.fd, 4096, RUN_PAGES, src_name=mf.path)
    for bi, b in enumerate(mf.blocks):
        copier.copy(b.runs(RUN_PAGES), fd, w.placed[bi].pages_offset, progress)
        w.set_present(bi, b.present_pages())
    return w.finish()


def to_stream(mf: MigrationFile, write: Callable[[bytes | memoryview], object], *,
              progress: Progress | None = None) -> int:
    """Write ``mf`` as a single-pass sequential stream; return bytes written."""
    _require_complete(mf)
    state = MachineState.from_file(mf).with_mapped_ram(False)
    w = StreamWriter(write, state, BlockSpec.of(mf.blocks))
    w.begin()
    w.begin_part()
    copier = RunCopier(mf.fd, 4096, RUN_PAGES, src_name=mf.path)
    for bi, b in enumerate(mf.blocks):
        for run in b.runs(RUN_PAGES):
            if run.stride == b.page_size and w.continues(bi):
                # Pages land in their record slots directly: no interleaving copy.
                rec = w.continuing_records(bi, run.first, run.count)
                copier.read_records(rec, 8, run.file_offset)
                w.raw(memoryview(rec).cast("B"))
            else:
                w.pages(bi, run.first, copier.read_run(run))
            if progress is not None:
                progress(run.count * b.page_size)
        # Pages the source knows are zero become ZERO records. Pages it has no
        # copy of (never sent; a clear mapped-ram bit) get none: QEMU's loader
        # leaves those as they are, so the destination ends in the same state,
        # and a block length read from the file never sets the output's size.
        w.zeros(bi, b.zeroed_pages())
    w.end_part()
    w.begin_part(end=True)
    w.end_part()
    w.finish()
    return w.bytes_written


def convert_file(src: str, dst: str, to: str, *, offset: int = 0, src_offset: int | None = None,
                 force: bool = False, progress: Progress | None = None,
                 stdout: BinaryIO | None = None) -> int:
    """Convert ``src`` into ``dst`` (``-`` for stdout with ``to='stream'``).

    :return: bytes of the output.
    :raise OutputError: the output exists (without ``force``) or cannot be
        written; nothing is left under ``dst`` then.
    """
    if to not in ("mapped-ram", "stream"):
        raise ValueError(to)
    with MigrationFile(src, offset=src_offset) as mf:
        if dst == "-":
            if to != "stream":
                raise OutputError("mapped-ram output needs a seekable file, not stdout")
            out = stdout
            assert out is not None
            return to_stream(mf, out.write, progress=progress)
        if os.path.lexists(dst) and os.path.samefile(src, dst):
            raise OutputError(f"{dst}: output is the input file")
        ao = AtomicOutput(dst, force=force)
        try:
            if to == "mapped-ram":
                end = to_mapped_ram(mf, ao.fd, start=offset, progress=progress)
            else:
                bw = BackgroundWriter(ao.fd, offset)
                try:
                    n = to_stream(mf, bw.write, progress=progress)
                finally:
                    bw.close()
                end = offset + n
            ao.commit(end)
            return end
        except OSError as e:
            raise output_error(dst, e) from e
        finally:
            if not ao.done:
                ao.abort()
