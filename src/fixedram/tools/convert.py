"""``fixedram convert``: stream <-> mapped-ram, pages moved in coalesced runs.

A multi-pass stream becomes a bounded, sparse mapped-ram file (only the last
copy of each page is kept); a mapped-ram file becomes a single-pass stream
that any QEMU can load with mapped-ram off. Device sections are copied
verbatim and the vmdesc trailer is rewritten for the output's configuration
(see :class:`~fixedram.format.machine.MachineState`), so the result restores
the same VM and describes itself truthfully.

A libvirt save image stays one: the output gets the input's header, domain
XML and cookie, with the header's format saying what follows (``raw`` for a
stream, ``sparse`` for mapped-ram, whose offsets are then absolute in the
image as libvirt 11 writes them), so ``virsh restore`` takes it. ``bare``
writes the plain QEMU file instead.

Inputs that can only be read in one pass (a pipe, a compressed image) are
converted as they are read (:mod:`fixedram.format.sequential`): to mapped-ram,
each page is written at its fixed offset as it arrives, through the same
writer and run writes as ``fixedram receive``; to a stream, the stream is
copied as it is, and checked record by record on the way (rewriting it as a
single pass would need each page's last copy, known only at the end).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from ..errors import IncompleteSave, OutputError
from ..format.libvirt import LibvirtHeader
from ..format.machine import MachineState
from ..format.migfile import MigrationFile
from ..format.sequential import (
    OnePassFile,
    SequentialInput,
    scan,
)
from ..format.walker import Save
from ..format.writer import BlockSpec, MappedRamWriter, StreamWriter, refuse_unloadable_mapped_ram
from ..memory.copy import RUN_PAGES, RunCopier
from ..output import AtomicOutput, BackgroundWriter, output_error
from ..save import open_save

__all__ = ["convert_file", "copy_one_pass", "to_mapped_ram", "to_stream"]

Progress = Callable[[int], None]


def _require_complete(mf: Save) -> None:
    if not mf.complete:
        raise IncompleteSave(f"{mf.path}: the input save is incomplete (no EOF marker, or an "
                             f"unfinished libvirt image, at byte {mf.size}); refusing to "
                             "convert it")


LIBVIRT_FORMAT_OF = {"stream": "raw", "mapped-ram": "sparse"}


def to_mapped_ram(mf: MigrationFile, fd: int, *, start: int = 0,
                  progress: Progress | None = None) -> int:
    """Write ``mf`` as a mapped-ram file on ``fd`` from ``start``; return its end."""
    refuse_unloadable_mapped_ram(mf.header, mf.path)
    _require_complete(mf)
    state = MachineState.from_file(mf).with_mapped_ram(True)
    w = MappedRamWriter(fd, state, BlockSpec.of(mf.blocks), start=start, fresh=True)
    copier = RunCopier(mf.source, 4096, RUN_PAGES, src_name=mf.path)
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
    copier = RunCopier(mf.source, 4096, RUN_PAGES, src_name=mf.path)
    for bi, b in enumerate(mf.blocks):
        for run in b.runs(RUN_PAGES):
            if run.stride == b.page_size and w.continues(bi):
                # Pages land in their record slots directly: no interleaving copy.
                rec = w.continuing_records(bi, run.first, run.count)
                copier.read_records(rec, 8, run.file_offset)
                w.raw(rec.data.cast("B"))
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
                 stdout: BinaryIO | None = None, bare: bool = False, stdin_fd: int = 0,
                 snapshot: str | None = None) -> int:
    """Convert ``src`` (``-``: standard input) into ``dst`` (``-``: stdout, stream only).

    ``snapshot``: in a qcow2 image, the internal snapshot whose VM state is converted.

    A libvirt image in gives a libvirt image out unless ``bare`` (or the
    output is stdout, where a QEMU ``exec:`` reads a plain stream).

    :return: bytes of the output.
    :raise OutputError: the output exists (without ``force``) or cannot be
        written; nothing is left under ``dst`` then.
    """
    if to not in ("mapped-ram", "stream"):
        raise ValueError(to)
    if dst == "-" and to != "stream":
        raise OutputError("mapped-ram output needs a seekable file, not stdout")
    save = open_save(src, offset=src_offset, strict=True, stdin_fd=stdin_fd,
                     snapshot=snapshot)
    if isinstance(save, OnePassFile):  # its stream is copied or written as it arrives
        with save.src as si:
            return _convert_one_pass(si, dst, to, offset=offset, force=force, bare=bare,
                                     stdout=stdout)
    assert isinstance(save, MigrationFile)
    real = save.path
    with save as mf:
        if to == "mapped-ram":  # before an output exists (to_mapped_ram checks it again)
            refuse_unloadable_mapped_ram(mf.header, mf.path)
        lv = _libvirt_out(mf.libvirt, dst, offset, bare)
        if dst == "-":
            out = stdout
            assert out is not None
            return to_stream(mf, out.write, progress=progress)
        if os.path.lexists(dst) and os.path.samefile(real, dst):
            raise OutputError(f"{dst}: output is the input file")
        start = lv.data_offset if lv is not None else offset
        ao = AtomicOutput(dst, force=force)
        try:
            if to == "mapped-ram":
                end = to_mapped_ram(mf, ao.fd, start=start, progress=progress)
            else:
                bw = BackgroundWriter(ao.fd, start)
                try:
                    n = to_stream(mf, bw.write, progress=progress)
                finally:
                    bw.close()
                end = start + n
            _finish(ao, end, lv, to)
            return end
        except OSError as e:
            raise output_error(dst, e) from e
        finally:
            if not ao.done:
                ao.abort()


def _libvirt_out(lv: LibvirtHeader | None, dst: str, offset: int,
                 bare: bool) -> LibvirtHeader | None:
    """The header to write, or None for a bare QEMU file."""
    if lv is None or bare or dst == "-":
        return None
    if offset:
        raise OutputError("--offset places a bare QEMU file; in a libvirt image the QEMU data "
                          "start after its header (use --bare for a bare file at an offset)")
    return lv


def _finish(ao: AtomicOutput, end: int, lv: LibvirtHeader | None, to: str) -> None:
    """Write the libvirt header last (the image is whole only now) and commit."""
    if lv is not None:
        os.pwrite(ao.fd, lv.with_format(LIBVIRT_FORMAT_OF[to]).encode(), 0)
    ao.commit(end)


class _MappedRamTarget:
    """Pages of a one-pass input written at their mapped-ram offsets as they arrive."""

    def __init__(self, fd: int, start: int) -> None:
        self.fd = fd
        self.start = start
        self.w: MappedRamWriter | None = None

    def begin(self, f: Save) -> None:
        # The first moment a one-pass input's capabilities are known; no page written yet.
        refuse_unloadable_mapped_ram(f.header, f.path)
        assert f.summary is not None
        hdr = f.header
        # Devices arrive after RAM: the full machine state replaces this one at the end.
        state = MachineState(hdr.machine, tuple(hdr.capabilities), hdr.uuid,
                             f.summary.ram_sections[0].section_id).with_mapped_ram(True)
        self.w = MappedRamWriter(self.fd, state, BlockSpec.of(f.blocks), start=self.start,
                                 fresh=True)

    def pages(self, bi: int, idx: np.ndarray, data: np.ndarray) -> None:
        assert self.w is not None
        self.w.write_runs(bi, idx, data)

    def zeros(self, bi: int, idx: np.ndarray, had_data: np.ndarray) -> None:
        assert self.w is not None
        self.w.mark_zero(bi, idx)


def copy_one_pass(si: SequentialInput, write: Callable[[bytes | memoryview], object]) -> int:
    """The QEMU stream of a one-pass input, as it is, to ``write`` (a pipe, a socket),
    each record checked on the way; return the stream's length.

    Raises, after what was written so far, when the stream is malformed or
    incomplete. The reader reads ahead, so bytes after the stream's end (none
    in a QEMU stream or a libvirt image) may follow it.
    """
    si.tee(write)
    with scan(si, strict=True) as f:
        _require_complete(f)
        return f.size - f.start


def _convert_one_pass(si: SequentialInput, dst: str, to: str, *, offset: int, force: bool,
                      bare: bool, stdout: BinaryIO | None) -> int:
    lv = _libvirt_out(si.libvirt, dst, offset, bare)
    if dst == "-":
        assert stdout is not None
        return copy_one_pass(si, stdout.write)
    if si.path != "-" and os.path.lexists(dst) and os.path.samefile(si.path, dst):
        raise OutputError(f"{dst}: output is the input file")
    start = lv.data_offset if lv is not None else offset
    ao = AtomicOutput(dst, force=force)
    try:
        if to == "mapped-ram":
            target = _MappedRamTarget(ao.fd, start)
            with scan(si, target, strict=True) as f:
                _require_complete(f)
                assert target.w is not None
                target.w.state = MachineState.from_file(f).with_mapped_ram(True)
                end = target.w.finish()
        else:
            bw = BackgroundWriter(ao.fd, start)
            try:
                si.tee(bw.write)
                with scan(si, strict=True) as f:
                    _require_complete(f)
                    # Bytes read ahead past the stream's end are not part of it.
                    end = start + f.size - f.start
            finally:
                bw.close()
        _finish(ao, end, lv, to)
        return end
    except OSError as e:
        raise output_error(dst, e) from e
    finally:
        if not ao.done:
            ao.abort()
