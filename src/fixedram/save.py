"""One way to open a save, whatever it is and wherever it comes from.

A save reaches fixedram as a plain QEMU migration file (a stream or a
mapped-ram file), a ``virsh save`` image (raw, sparse or compressed), a bare
compressed file, or standard input. :func:`open_save` looks at the input once
and returns the reader that suits it, under one declared type, :class:`Save`:

* random access (``save.random_access``): a file, read at offsets, whose
  facts are known as soon as it is open (``MigrationFile``);
* one pass: a pipe or a compressed input, read front to back once; its facts
  are known after :meth:`~fixedram.format.sequential.OnePassFile.walk`, and
  its pages are seen only by that walk's target (``OnePassFile``).

A qcow2 disk image holds saves too: the VM state of each internal snapshot
(``savevm``), read in place through the snapshot's tables
(:mod:`fixedram.io.qcow2`) as a random-access ``MigrationFile``.

Every command and library consumer opens saves here, so a new kind of input
is added in one place.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from .errors import FormatError, InputError, UsageError
from .format.libvirt import HEADER_SIZE, MAGIC_DONE, MAGIC_PART, parse_libvirt
from .format.migfile import MigrationFile
from .format.sequential import OnePassFile, open_sequential, sniff_compression
from .format.walker import BlockFacts, Save

__all__ = ["BlockFacts", "Save", "is_qcow2_file", "open_file", "open_save", "random_access_path",
           "reads_one_pass"]


def random_access_path(path: str, stdin_fd: int = 0) -> str | None:
    """The path a random-access reader can open for ``path``, or None.

    ``-`` is standard input: a regular file behind it (``< vm.sav``) is
    opened again through ``/dev/fd``; a pipe has no such path.
    """
    if path != "-":
        return path
    try:
        st = os.fstat(stdin_fd)
    except OSError as e:  # standard input closed (``<&-``)
        raise InputError("stdin", e) from e
    return f"/dev/fd/{stdin_fd}" if stat.S_ISREG(st.st_mode) else None


def is_qcow2_file(path: str, *, stdin_fd: int = 0) -> bool:
    """True when ``path`` (``-``: standard input redirected from a file) is a qcow2 image."""
    from .io.qcow2 import is_qcow2

    real = random_access_path(path, stdin_fd)
    if real is None:
        return False
    try:
        with open(real, "rb") as f:
            return is_qcow2(f.read(4))
    except OSError:
        return False  # the reader reports it, naming the file


def _one_pass_head(real: str) -> bool:
    """True when the file at ``real`` starts like an input that must be
    decoded front to back (a compressed libvirt image, a compressed file)."""
    try:
        with open(real, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError:
        return False  # the random-access reader reports it, naming the file
    if head[:16] in (MAGIC_DONE, MAGIC_PART) and len(head) == HEADER_SIZE:
        try:
            hdr, _n = parse_libvirt(head, real)
        except FormatError:
            return False  # reported by the random-access reader, with its offset
        return hdr.compressed
    return sniff_compression(head) is not None


def reads_one_pass(path: str, *, stdin_fd: int = 0) -> bool:
    """True when ``path`` can only be read in one pass (a pipe, a compressed
    image or file); False for a file that can be read at offsets."""
    real = random_access_path(path, stdin_fd)
    return real is None or _one_pass_head(real)


def open_save(path: str | os.PathLike[str], *, offset: int | None = None,
              strict: bool = False, progress: Callable[[int], None] | None = None,
              stdin_fd: int = 0, snapshot: str | None = None) -> Save:
    """Open the save at ``path`` (``-``: standard input) with the reader it needs.

    :param offset: where the QEMU stream starts; by default after a libvirt
        header, else where the QEVM magic is found (0 on a pipe).
    :param strict: refuse a save that ends before its EOF marker; otherwise it
        opens with ``complete = False`` (for one pass: once walked).
    :param progress: called with the bytes indexed so far while a file's
        stream is walked at open (random access only).
    :param stdin_fd: the descriptor ``-`` stands for.
    :param snapshot: in a qcow2 image, the id or tag of the internal snapshot
        whose VM state is the save; may be omitted when exactly one holds VM state.
    :return: a :class:`Save`. Random access: indexed and ready. One pass:
        call ``walk()`` (with a page target, or none for facts only) first.
    :raise InputError: the input cannot be opened or read.
    :raise FormatError: the input is not a save fixedram reads.
    :raise UsageError: ``snapshot`` on an input that is not a qcow2 image; in a
        qcow2 image, no such snapshot, or none given and not exactly one
        holding VM state (the message lists them).
    """
    p = os.fspath(path)
    real = random_access_path(p, stdin_fd)
    if real is not None and is_qcow2_file(real):
        return _open_snapshot(p, real, snapshot, offset, strict, progress)
    _no_snapshot(p, snapshot)
    if real is not None and not _one_pass_head(real):
        return MigrationFile(real, offset=offset, strict=strict, progress=progress)
    return OnePassFile(open_sequential(p, offset=offset, stdin_fd=stdin_fd), strict=strict)


def open_file(path: str, *, offset: int | None = None, strict: bool = True,
              progress: Callable[[int], None] | None = None,
              snapshot: str | None = None) -> MigrationFile:
    """A save that is a file, for random access: the file itself, or in a qcow2
    image the VM state of ``snapshot`` (as :func:`open_save`). The defaults
    are :class:`MigrationFile`'s (``strict``)."""
    if is_qcow2_file(path):
        return _open_snapshot(path, path, snapshot, offset, strict, progress)
    _no_snapshot(path, snapshot)
    return MigrationFile(path, offset=offset, strict=strict, progress=progress)


def _no_snapshot(p: str, snapshot: str | None) -> None:
    if snapshot is not None:
        raise UsageError(f"{'stdin' if p == '-' else p}: --snapshot reads a qcow2 image's "
                         "internal snapshot, and this is not a qcow2 image")


def _open_snapshot(p: str, real: str, snapshot: str | None, offset: int | None, strict: bool,
                   progress: Callable[[int], None] | None) -> MigrationFile:
    from .io.qcow2 import Qcow2Image

    img = Qcow2Image(real)
    try:
        vm = img.vm_state(img.find(snapshot))
    except BaseException:
        img.close()
        raise
    # The MigrationFile owns the source, and the source the image.
    return MigrationFile(p, offset=offset, strict=strict, progress=progress, source=vm)
