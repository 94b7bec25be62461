"""Extract guest RAM from a migration file: raw blocks, a physical image, an ELF core.

All outputs are sparse (pages never sent or sent as zero stay holes) and
atomic (temporary name, renamed when complete). RAMBlock names are untrusted
file names: they are sanitised and can never escape the output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from typing import BinaryIO

from ..describe import SCHEMA_VERSION
from ..errors import IncompleteSave, InputError, OutputError, UsageError
from ..format.migfile import MigrationFile, RAMBlock
from ..format.sequential import OnePassFile
from ..format.walker import Save
from ..output import AtomicOutput, output_error, staged_directory
from .copy import RUN_PAGES, RunCopier
from .elfcore import build_core
from .elfcore import log as elfcore_log
from .layout import PhysRange, physical_ranges

__all__ = ["extract", "extract_elf", "extract_physical", "extract_raw", "safe_block_filename",
           "sha256_fd", "stream_image", "total_bytes", "write_index"]

Progress = Callable[[int], None]
_ZEROS = bytes(1 << 20)  # holes of an image written in order to a pipe
_SAFE = re.compile(r"[^A-Za-z0-9._@+-]")
_HASH_READ = 1 << 20  # bytes per read while hashing a file


def safe_block_filename(idstr: str) -> str:
    """A file name for a RAMBlock that stays inside its directory.

    ``/rom@etc/acpi/tables`` becomes ``rom@etc_acpi_tables``; names that
    sanitise to nothing, dot names and over-long names get a hash suffix so
    two blocks never collide.
    """
    s = _SAFE.sub("_", idstr.strip("/")).lstrip(".")
    if not s or s != idstr.strip("/").replace("/", "_") or len(s) > 120:
        h = hashlib.sha256(idstr.encode()).hexdigest()[:8]
        s = f"{s[:100] or 'block'}-{h}"
    return s + ".bin"


def total_bytes(mf: Save) -> int:
    """Bytes of page data the save holds (what an extract copies)."""
    return sum(b.pages_present * b.page_size for b in mf.blocks)


def extract(save: Save, output: str, fmt: str = "raw", *, force: bool = False,
            allow_incomplete: bool = False, progress: Progress | None = None,
            stdout: BinaryIO | None = None, compress: str | None = None) -> None:
    """Write guest RAM out of ``save``, opened with :func:`fixedram.open_save`.

    :param output: a directory (``raw``) or a file (``physical``, ``elf``);
        ``-`` writes a ``physical`` or ``elf`` image in order to ``stdout``.
    :raise UsageError: an output the input cannot give (raw to stdout; a
        one-pass input to stdout: its pages arrive out of order).
    :raise IncompleteSave: the save has no end, without ``allow_incomplete``.
    """
    if fmt == "kdump":  # its own writer (.kdump), with a page codec
        from .kdump import extract_kdump

        if isinstance(save, MigrationFile) and save.fd < 0:
            raise UsageError(f"{save.path}: a kdump core is written from a save file; convert "
                             "the snapshot to one first ('fixedram convert IMAGE --snapshot ID "
                             "OUT --to mapped-ram')")
        extract_kdump(save, output, compress=compress, force=force,
                      allow_incomplete=allow_incomplete, progress=progress)
        return
    to_stdout = output == "-"
    if to_stdout and fmt == "raw":
        raise UsageError("-o - needs --format physical or elf: raw output is a directory "
                         "of files, one per RAMBlock")
    if not isinstance(save, MigrationFile):
        from .stream_extract import extract_one_pass

        if to_stdout:
            # Pages of a pipe arrive in any order, and an ELF core's headers are known last.
            what, example = (("an ELF core", "core.elf") if fmt == "elf"
                             else ("a guest-physical image", "ram.img"))
            raise UsageError(f"{save.path}: {what} of a pipe or a compressed image cannot go "
                             f"to standard output (it is written out of order): write it to "
                             f"a file: -o {example}")
        assert isinstance(save, OnePassFile)
        extract_one_pass(save, output, fmt, force=force, allow_incomplete=allow_incomplete)
        return
    if not save.complete and not allow_incomplete:
        raise IncompleteSave(f"{save.path}: the save is incomplete "
                             f"({save.error or 'unfinished'}); use --allow-incomplete to "
                             "extract what it holds")
    if to_stdout:  # in order, holes as zeros: stdout may be a pipe
        assert stdout is not None
        stream_image(save, fmt, stdout, progress=progress)
    elif fmt == "raw":
        extract_raw(save, output, force=force, progress=progress)
    elif fmt == "physical":
        extract_physical(save, output, force=force, progress=progress)
    elif fmt == "elf":
        extract_elf(save, output, force=force, progress=progress)
    else:
        raise UsageError(f"unknown output format {fmt!r}")


def unique_names(mf: Save) -> list[str]:
    """One distinct file name per block, whatever names the file declares."""
    used: set[str] = {"index.json"}
    names = []
    for b in mf.blocks:
        name = safe_block_filename(b.idstr)
        k = 0
        while name in used:  # e.g. "a/b" and "a_b"; the suffixed name may be taken too
            k += 1
            name = safe_block_filename(f"{b.idstr}#{b.index}.{k}")
        used.add(name)
        names.append(name)
    return names


def extract_raw(mf: MigrationFile, outdir: str | os.PathLike[str], *, force: bool = False,
                progress: Progress | None = None) -> dict[str, object]:
    """One sparse file per RAMBlock plus ``index.json``; returns the index.

    The directory is built under a hidden temporary name beside ``outdir`` and
    renamed when complete, so an interrupted run leaves no partial set. An
    existing empty directory is replaced; one holding an earlier extract only
    with ``force`` (:func:`~fixedram.output.staged_directory`).
    """
    with staged_directory(outdir, force) as tmp:
        return _write_raw_set(mf, tmp, progress)


def _write_raw_set(mf: MigrationFile, d: str, progress: Progress | None) -> dict[str, object]:
    copier = RunCopier(mf.source, 4096, RUN_PAGES, src_name=mf.path)
    names = unique_names(mf)
    for b, name in zip(mf.blocks, names, strict=True):
        path = os.path.join(d, name)
        if os.path.dirname(path) != d:  # defence in depth
            raise OutputError(f"block name {b.idstr!r} would leave the output directory")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                copier.copy(b.runs(RUN_PAGES), fd, 0, progress)
                os.ftruncate(fd, b.used_length)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise output_error(path, e) from e
    return write_index(d, mf, names, _input_sha256(mf))


def _input_sha256(mf: MigrationFile) -> str:
    """The input's sha256 as it is on disk: the file itself, or the whole image a
    source such as a qcow2 snapshot's VM state is read from."""
    if mf.fd >= 0:
        return sha256_fd(mf.fd, mf.path)
    try:
        fd = os.open(mf.input_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(mf.input_path, e) from e
    try:
        return sha256_fd(fd, mf.input_path)
    finally:
        os.close(fd)


def sha256_fd(fd: int, name: str) -> str:
    """The sha256 of the whole file behind ``fd``, read at offsets from its start."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_READ)
    view = memoryview(buf)
    off = 0
    while True:
        try:
            n = os.preadv(fd, [view], off)
        except OSError as e:
            raise InputError(name, e, offset=off) from e
        if n == 0:
            return h.hexdigest()
        h.update(view[:n])
        off += n


def write_index(d: str, f: Save, names: list[str], source_sha256: str | None
                ) -> dict[str, object]:
    """Write ``index.json`` of a raw set in ``d`` (docs/json.md) and return it: the
    save's facts, each block's file with the sha256 of its bytes as written, and
    ``source_sha256``, the input file's (None for a pipe, which cannot be read again).
    """
    entries = []
    for b, name in zip(f.blocks, names, strict=True):
        path = os.path.join(d, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                digest = sha256_fd(fd, path)
            finally:
                os.close(fd)
        except (OSError, InputError) as e:
            raise OutputError(f"{path}: cannot be read back to be hashed: {e}") from e
        entries.append({"idstr": b.idstr, "file": name, "used_length": b.used_length,
                        "page_size": b.page_size, "pages_present": b.pages_present,
                        "sha256": digest})
    index: dict[str, object] = {"schema_version": SCHEMA_VERSION, "source": f.input_path,
                                "source_sha256": source_sha256, "format": f.format,
                                "machine": f.machine, "complete": f.complete,
                                "blocks": entries}
    if f.libvirt is not None:
        index["libvirt_image_format"] = f.libvirt.format
    path = os.path.join(d, "index.json")
    try:
        with open(path, "x") as fh:
            fh.write(json.dumps(index, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise output_error(path, e) from e
    return index


def _write_ranges(mf: MigrationFile, placed: list[tuple[PhysRange[RAMBlock], int]], fd: int,
                  progress: Progress | None) -> None:
    """Copy each range's pages to ``fd`` at the output offset paired with it."""
    copier = RunCopier(mf.source, 4096, RUN_PAGES, src_name=mf.path)
    for pr, dst in placed:
        ps = pr.block.page_size
        lo, hi = pr.block_offset // ps, (pr.block_offset + pr.length) // ps
        runs = (c for r in pr.block.runs(RUN_PAGES) if (c := r.clip(lo, hi)) is not None)
        # Runs keep their block page numbers: shift the base so page lo lands at dst.
        copier.copy(runs, fd, dst - lo * ps, progress)


def _write_image(mf: MigrationFile, out: AtomicOutput,
                 placed: list[tuple[PhysRange[RAMBlock], int]],
                 head: bytes | Callable[[], bytes],
                 size: int, progress: Progress | None) -> None:
    """Fill ``out`` with ``size`` bytes and commit it: each range at its offset,
    then ``head`` at 0. The caller opens ``out`` before any other work, so a
    refused output is the first and only thing said.

    ``head`` may be a function, called once the ranges are written (an ELF
    core's notes can depend on a scan that runs during the copy).
    """
    try:
        _write_ranges(mf, placed, out.fd, progress)
        data = head() if callable(head) else head
        if data:
            os.pwrite(out.fd, data, 0)
        out.commit(size)
    except OSError as e:
        raise output_error(out.path, e) from e
    finally:
        if not out.done:
            out.abort()


def extract_physical(mf: MigrationFile, out_path: str | os.PathLike[str], *,
                     force: bool = False,
                     progress: Progress | None = None) -> list[PhysRange[RAMBlock]]:
    """A sparse image of guest-physical memory (x86 pc/q35 layout)."""
    with AtomicOutput(out_path, force=force) as out:
        ranges = physical_ranges(mf)
        _write_image(mf, out, [(r, r.gpa) for r in ranges], b"",
                     max(r.gpa + r.length for r in ranges), progress)
    return ranges


def extract_elf(mf: MigrationFile, out_path: str | os.PathLike[str], *, force: bool = False,
                progress: Progress | None = None) -> list[PhysRange[RAMBlock]]:
    """An ELF64 core as QEMU's dump-guest-memory writes it; returns its LOAD ranges.

    Notes first (per-vCPU registers, QEMU's CPU state, the guest's VMCOREINFO;
    see :mod:`.elfcore`), then one PT_LOAD per guest-physical range (RAM and
    the BIOS), p_vaddr = p_paddr. Segment data start page-aligned, so the copy
    stays page-aligned and sparse. When the registers cannot be decoded the
    core has no register notes and one warning line is logged (logger
    ``fixedram.memory.elfcore``; without logging set up it goes to stderr).

    RAM is scanned for the VMCOREINFO note by a second thread while the main
    one copies it (both are system calls and numpy loops that release the GIL).
    """
    with AtomicOutput(out_path, force=force) as out:
        core = build_core(mf, scan_ram=False)
        for w in core.warnings:
            elfcore_log.warning("fixedram: warning: %s: %s", mf.path, w)
        stop = threading.Event()
        failed: list[BaseException] = []

        def scan() -> None:
            try:
                core.scan_ram(mf, stop.is_set)
            except BaseException as e:  # re-raised by the main thread
                failed.append(e)

        scanner = threading.Thread(target=scan, name="fixedram-vmcoreinfo-scan", daemon=True)

        def head() -> bytes:
            if scanner.ident is not None:
                scanner.join()
            if failed:
                raise failed[0]
            return core.head()

        if core.scan_pending:
            scanner.start()
        try:
            _write_image(mf, out, core.placed(), head, core.size, progress)
        finally:
            stop.set()  # an error in the copy: the scan must not outlive the input's fd
            if scanner.ident is not None:
                scanner.join()
    return core.loads


def stream_image(mf: MigrationFile, fmt: str, out: BinaryIO,
                 progress: Progress | None = None) -> list[PhysRange[RAMBlock]]:
    """A ``physical`` or ``elf`` image written in order to ``out`` (``-o -``, a pipe).

    A pipe cannot seek, so holes are written as zeros and the ELF header goes
    first: its notes are built before the copy, with RAM scanned for
    VMCOREINFO beforehand (a second read of RAM, for that scan only).
    """
    if fmt == "physical":
        ranges = physical_ranges(mf)
        placed = [(r, r.gpa) for r in ranges]
        head, size = b"", max(r.gpa + r.length for r in ranges)
    elif fmt == "elf":
        core = build_core(mf, scan_ram=True)
        for w in core.warnings:
            elfcore_log.warning("fixedram: warning: %s: %s", mf.path, w)
        ranges, placed, head, size = core.loads, core.placed(), core.head(), core.size
    else:
        raise OutputError(f"--format {fmt} cannot go to standard output: it is a directory "
                          "of files, one per RAMBlock")
    pos = 0

    def fill(upto: int) -> None:
        nonlocal pos
        while pos < upto:
            n = min(upto - pos, len(_ZEROS))
            out.write(_ZEROS[:n])
            pos += n

    out.write(head)
    pos = len(head)
    copier = RunCopier(mf.source, 4096, RUN_PAGES, src_name=mf.path)
    for pr, dst in sorted(placed, key=lambda p: p[1]):
        if dst < pos:  # layouts never overlap; a pipe could not go back if one did
            raise OutputError(f"{mf.path}: output ranges overlap at 0x{dst:x}")
        ps = pr.block.page_size
        lo, hi = pr.block_offset // ps, (pr.block_offset + pr.length) // ps
        for r in pr.block.runs(RUN_PAGES):
            c = r.clip(lo, hi)
            if c is None:
                continue
            fill(dst + (c.first - lo) * ps)
            out.write(copier.read_run(c))
            pos += c.count * ps
            if progress is not None:
                progress(c.count * ps)
        fill(dst + pr.length)
    fill(size)
    out.flush()
    return ranges
