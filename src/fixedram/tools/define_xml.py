"""``fixedram define-xml``: replace the domain XML of a libvirt save image.

What ``virsh save-image-define`` does, without libvirtd: the image's header
keeps the XML that ``virsh restore`` defines the domain from. libvirt leaves
64 KiB of zeros after the XML and cookie, so a new XML usually fits where the
old one was: the header is then rewritten in place (one write of the bytes
before the QEMU data, then fsync), as libvirt does. A longer XML cannot move
the QEMU data in place, so the image is written anew under a temporary name
beside it and renamed over it only when complete: an interruption leaves the
old image whole.

A raw or compressed image's QEMU data do not depend on where they start and
are copied as they are (in the kernel, holes kept). A ``sparse`` image holds a
mapped-ram stream whose page offsets are absolute in the image: it is written
again through the mapped-ram writer at the new start.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace

from ..errors import InputError, UsageError
from ..format.libvirt import LIBVIRT_PAD, LibvirtHeader, probe_libvirt
from ..output import AtomicOutput, output_error

__all__ = ["DefineResult", "define_xml"]

_MAX_XML = 16 << 20  # far above any domain XML; the header field allows 64 MiB


@dataclass(frozen=True)
class DefineResult:
    """What :func:`define_xml` did: ``in_place`` or a rewrite of ``bytes_written``."""

    in_place: bool
    bytes_written: int
    data_offset: int


def _check_xml(xml: bytes, name: str) -> None:
    """A well-formed ``<domain>`` document (libvirt refuses anything else at restore)."""
    nul = xml.find(b"\0")
    if nul >= 0:
        raise UsageError(f"{name}: the domain XML holds a NUL byte at byte {nul}, which "
                         "would end it in the image")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise UsageError(f"{name}: not well-formed XML: {e}") from None
    if root.tag != "domain":
        raise UsageError(f"{name}: the root element is <{root.tag}>, not <domain>")


def define_xml(image: str, xml: bytes, *, xml_name: str = "XML") -> DefineResult:
    """Make ``xml`` the domain XML of the libvirt save image ``image``.

    :raise UsageError: ``image`` is not a libvirt save image, or is unfinished.
    :raise UsageError: ``xml`` is not a well-formed ``<domain>`` document.
    :raise OutputError: the image cannot be written; it is left as it was.
    """
    if len(xml) > _MAX_XML:
        raise UsageError(f"{xml_name}: {len(xml)} bytes of XML, more than a save image takes "
                         f"({_MAX_XML})")
    xml = xml.rstrip(b"\n") + b"\n"  # as virsh stores it: one final newline
    _check_xml(xml, xml_name)
    try:
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(image, e) from e
    try:
        size = os.fstat(fd).st_size
        old = probe_libvirt(fd, size, image, allow_compressed=True)
        if old is None:
            raise UsageError(f"{image}: not a libvirt save image (virsh save), so it holds no "
                             "domain XML to replace")
        if not old.complete:
            raise UsageError(f"{image}: the libvirt image is unfinished (LibvirtQemudPart); "
                             "its save did not complete")
        new = replace(old, xml_raw=xml, xml=xml.decode("utf-8", "replace"))
        body = len(xml) + 1 + (len(old.cookie) + 1 if old.cookie is not None else 0)
        if body <= old.data_len:
            head = new.encode()
            try:
                os.pwrite(fd, head, 0)
                os.fsync(fd)
            except OSError as e:
                raise output_error(image, e) from e
            return DefineResult(True, len(head), old.data_offset)
    finally:
        os.close(fd)
    return _rewrite(image, replace(new, data_len=body + LIBVIRT_PAD), old)


def _rewrite(image: str, new: LibvirtHeader, old: LibvirtHeader) -> DefineResult:
    """The image written again with ``new``'s header, its QEMU data after it."""
    with AtomicOutput(image, force=True, mode=os.stat(image).st_mode & 0o7777) as out:
        try:
            if new.format == "sparse":
                from ..format.migfile import MigrationFile
                from .convert import to_mapped_ram

                with MigrationFile(image) as mf:
                    end = to_mapped_ram(mf, out.fd, start=new.data_offset)
            else:
                end = _copy_data(image, old.data_offset, out.fd, new.data_offset)
            os.pwrite(out.fd, new.encode(), 0)
            out.commit(end)
        except OSError as e:
            raise output_error(image, e) from e
    return DefineResult(False, end, new.data_offset)


def _copy_data(image: str, start: int, fd_out: int, at: int) -> int:
    """Copy ``image`` from ``start`` to its end to ``fd_out`` at ``at``, holes kept;
    returns the output's size."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.fstat(fd).st_size
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            src, dst = data, at + (data - start)
            while src < hole:
                n = os.copy_file_range(fd, fd_out, hole - src, src, dst)
                if n == 0:
                    raise InputError(image, "the image shrank while it was copied", offset=src)
                src += n
                dst += n
            pos = hole
        return at + (end - start)
    finally:
        os.close(fd)
