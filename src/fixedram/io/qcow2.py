"""The VM state of a qcow2 internal snapshot, read in place.

``savevm`` (HMP) and ``snapshot-save`` (QMP) write the migration stream of
the whole VM into the image itself, past the end of the virtual disk: at the
first L1 slot beyond the disk size (``qcow2_vm_state_offset``). The snapshot
keeps its own copy of the L1 table, and QEMU discards the VM state from the
active one afterwards, so the state is found only through the snapshot's
L1 and L2 tables. :class:`SnapshotVMState` is that area as a random-access
:class:`~fixedram.io.source.ByteSource`: nothing is copied out.

The image is untrusted: every offset, size and count from it is checked
against the file before it is used, and a bad one is refused with the
image's name and the byte offset of the field. The image is opened
read-only and never written.

Facts from QEMU's docs/interop/qcow2.txt and block/qcow2*.c (10.0).
"""

from __future__ import annotations

import itertools
import os
import stat
import struct
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import (
    BadMagic,
    CorruptFile,
    InputError,
    TruncatedFile,
    UnsupportedFeature,
    UnsupportedVersion,
    UsageError,
)
from .source import Buffer

__all__ = ["QCOW2_MAGIC", "Qcow2Image", "Snapshot", "SnapshotVMState", "is_qcow2"]

QCOW2_MAGIC = b"QFI\xfb"

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes, through snapshots_offset
_HEADER_V3 = struct.Struct(">QQQII")  # 32 more: the feature words, refcount_order, header_length
_SNAP_HEAD = struct.Struct(">QIHHIIQII")  # 40 bytes (QCowSnapshotHeader)
_EXT_HEAD = struct.Struct(">II")

INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16
_INCOMPAT_KNOWN = 0x1F
_EXT_DATA_FILE = 0x44415441  # "DATA": the external data file's name
_EXT_BACKING_FORMAT = 0xE2792ACA

MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55 of L1 and standard L2 entries
_COMPRESSED = 1 << 62

# What a cluster of the VM state reads as (one code per L2 entry).
K_ZERO, K_DATA, K_COMPRESSED, K_MIXED = 0, 1, 2, 3
# Decoded L2 tables kept: one covers 512 MiB (64 KiB clusters) to 256 GiB.
_L2_CACHE = 8
_ZERO_CHUNK = 1 << 20


def is_qcow2(head: bytes) -> bool:
    """True when ``head`` (the file's first bytes) starts like a qcow2 image."""
    return head[:4] == QCOW2_MAGIC


@dataclass(frozen=True)
class Snapshot:
    """One entry of the snapshot table (``QCowSnapshotHeader`` and its extra data).

    :ivar entry_offset: image offset of the entry, for errors about it.
    :ivar icount: instruction count at the snapshot (record/replay), None if unknown.
    """

    id: str
    tag: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_ns: int
    vm_state_size: int
    disk_size: int
    icount: int | None
    extra_data_size: int
    entry_offset: int

    @property
    def has_vm_state(self) -> bool:
        return self.vm_state_size > 0

    @property
    def label(self) -> str:
        """How messages name it: its tag, or its id when the tag is empty."""
        return self.tag or self.id

    def as_dict(self, vm_state_offset: int) -> dict[str, Any]:
        return {"id": self.id, "tag": self.tag, "vm_state_size": self.vm_state_size,
                "date": self.date_sec, "date_nsec": self.date_nsec,
                "vm_clock_ns": self.vm_clock_ns, "icount": self.icount,
                "disk_size": self.disk_size, "has_vm_state": self.has_vm_state,
                "vm_state_offset": vm_state_offset, "l1_table_offset": self.l1_table_offset,
                "l1_size": self.l1_size}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class Qcow2Image:
    """A qcow2 image's header and snapshot table, opened read-only.

    :param path: the image.
    :raise InputError: it cannot be opened.
    :raise FormatError: it is not a qcow2 image fixedram reads, or a table is corrupt.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise InputError(self.path, e) from e
        self._data_fd = -1
        try:
            st = os.fstat(self.fd)
            self.file_size = (st.st_size if stat.S_ISREG(st.st_mode)
                              else os.lseek(self.fd, 0, os.SEEK_END))
            self._parse_header()
            self.snapshots = self._read_snapshots()
        except BaseException:
            self.close()
            raise

    # -- reading the image -------------------------------------------------------

    def read(self, n: int, offset: int, what: str) -> bytes:
        """Exactly ``n`` image bytes at ``offset``, or a TruncatedFile about ``what``."""
        if offset < 0 or n < 0 or offset + n > self.file_size:
            raise TruncatedFile(f"{what} ({n} bytes at {offset:#x}) runs past the end of the "
                                f"image ({self.file_size} bytes)", path=self.path, offset=offset)
        try:
            data = os.pread(self.fd, n, offset)
        except OSError as e:
            raise InputError(self.path, e, offset=offset) from e
        if len(data) != n:
            raise TruncatedFile(f"image ends inside {what}", path=self.path,
                                offset=offset + len(data))
        return data

    def _parse_header(self) -> None:
        head = self.read(min(self.file_size, 4096), 0, "the header") if self.file_size else b""
        if not is_qcow2(head):
            raise BadMagic("not a qcow2 image (no QFI\\xfb magic)", path=self.path, offset=0)
        if len(head) < _HEADER_V2.size:
            raise TruncatedFile("image ends inside the qcow2 header", path=self.path,
                                offset=len(head))
        (_m, self.version, self.backing_file_offset, self.backing_file_size, cluster_bits,
         self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
         self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
         self.snapshots_offset) = _HEADER_V2.unpack_from(head)
        if self.version not in (2, 3):
            raise UnsupportedVersion(f"qcow2 version {self.version} (only 2 and 3 exist)",
                                     path=self.path, offset=4)
        if not 9 <= cluster_bits <= 21:
            raise CorruptFile(f"cluster_bits {cluster_bits} is outside 9..21", path=self.path,
                              offset=20)
        self.cluster_bits: int = cluster_bits
        self.cluster_size = cs = 1 << cluster_bits
        self.incompatible = self.compatible = self.autoclear = 0
        self.refcount_order, self.header_length, self.compression_type = 4, 72, 0
        if self.version == 3:
            if len(head) < 104:
                raise TruncatedFile("image ends inside the qcow2 v3 header", path=self.path,
                                    offset=len(head))
            (self.incompatible, self.compatible, self.autoclear, self.refcount_order,
             self.header_length) = _HEADER_V3.unpack_from(head, 72)
            if self.header_length < 104 or self.header_length % 8 or self.header_length > cs:
                raise CorruptFile(f"header_length {self.header_length} is not a multiple of 8 "
                                  f"from 104 to the cluster size", path=self.path, offset=100)
            if self.header_length > 104:
                if len(head) < 105:
                    raise TruncatedFile("image ends inside the qcow2 header", path=self.path,
                                        offset=len(head))
                self.compression_type = head[104]
        unknown = self.incompatible & ~_INCOMPAT_KNOWN
        if unknown:
            raise UnsupportedFeature(f"incompatible feature bits {unknown:#x} are unknown",
                                     path=self.path, offset=72)
        self.extended_l2 = bool(self.incompatible & INCOMPAT_EXTL2)
        if self.extended_l2 and cluster_bits < 14:
            raise CorruptFile("extended L2 entries need clusters of at least 16 KiB",
                              path=self.path, offset=20)
        if not self.incompatible & INCOMPAT_COMPRESSION and self.compression_type != 0:
            raise CorruptFile(f"compression_type {self.compression_type} without the "
                              "compression-type feature bit", path=self.path, offset=104)
        if self.compression_type not in (0, 1):
            raise UnsupportedFeature(f"compression_type {self.compression_type} (known: 0 "
                                     "zlib, 1 zstd)", path=self.path, offset=104)
        # An extended L2 entry is 16 bytes (the standard word and the subcluster bitmap).
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_bits: int = cluster_bits - (4 if self.extended_l2 else 3)
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise CorruptFile(f"{self.nb_snapshots} snapshots, more than QEMU's "
                              f"{MAX_SNAPSHOTS}", path=self.path, offset=60)
        self.backing_file = self._backing_file(head)
        self.data_file, self.backing_format = self._extensions(head)

    def _backing_file(self, head: bytes) -> str | None:
        off, n = self.backing_file_offset, self.backing_file_size
        if off == 0:
            return None
        if n > 1023 or off + n > min(self.cluster_size, len(head)):
            raise CorruptFile(f"backing file name ({n} bytes at {off:#x}) is not inside the "
                              "first cluster", path=self.path, offset=8)
        return _text(head[off:off + n])

    def _extensions(self, head: bytes) -> tuple[str | None, str | None]:
        """The external data file's and backing format's names from the header extensions."""
        end = min(self.cluster_size, len(head))
        if self.backing_file_offset:
            end = min(end, self.backing_file_offset)
        pos = self.header_length
        data_file = backing_format = None
        while pos + 8 <= end:
            typ, n = _EXT_HEAD.unpack_from(head, pos)
            if typ == 0:
                break
            if pos + 8 + n > end:
                raise CorruptFile(f"header extension {typ:#x} ({n} bytes) runs past the "
                                  "first cluster", path=self.path, offset=pos)
            body = head[pos + 8:pos + 8 + n]
            if typ == _EXT_DATA_FILE:
                data_file = _text(body)
            elif typ == _EXT_BACKING_FORMAT:
                backing_format = _text(body)
            pos += 8 + (n + 7) // 8 * 8
        if self.incompatible & INCOMPAT_DATA_FILE and not data_file:
            raise CorruptFile("the external data file bit is set but no data file is named",
                              path=self.path, offset=72)
        return data_file, backing_format

    def _read_snapshots(self) -> list[Snapshot]:
        nb, off = self.nb_snapshots, self.snapshots_offset
        if nb == 0:
            return []
        if off % self.cluster_size or off == 0:
            raise CorruptFile(f"snapshot table offset {off:#x} is not cluster-aligned",
                              path=self.path, offset=64)
        if off + nb * _SNAP_HEAD.size > self.file_size:
            raise TruncatedFile(f"{nb} snapshot table entries at {off:#x} cannot fit in the "
                                f"image ({self.file_size} bytes)", path=self.path, offset=60)
        out: list[Snapshot] = []
        ids: set[str] = set()
        pos = off
        for i in range(nb):
            pos = (pos + 7) // 8 * 8
            if pos - off > MAX_SNAPSHOTS_SIZE:
                raise CorruptFile(f"snapshot table is larger than {MAX_SNAPSHOTS_SIZE} bytes",
                                  path=self.path, offset=pos)
            what = f"snapshot table entry {i} of {nb}"
            raw = self.read(_SNAP_HEAD.size, pos, what)
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize,
             extra) = _SNAP_HEAD.unpack(raw)
            if extra > MAX_SNAPSHOT_EXTRA:
                raise CorruptFile(f"{what}: {extra} bytes of extra data (at most "
                                  f"{MAX_SNAPSHOT_EXTRA})", path=self.path, offset=pos + 36)
            body = self.read(extra + id_len + name_len, pos + _SNAP_HEAD.size, what)
            ex = body[:extra]
            if len(ex) >= 8:
                vmsize = struct.unpack_from(">Q", ex, 0)[0]
            disk_size = struct.unpack_from(">Q", ex, 8)[0] if len(ex) >= 16 else self.size
            icount: int | None = struct.unpack_from(">Q", ex, 16)[0] if len(ex) >= 24 else None
            if icount == (1 << 64) - 1:
                icount = None
            sid = _text(body[extra:extra + id_len])
            if not sid:
                raise CorruptFile(f"{what} has an empty id", path=self.path, offset=pos + 12)
            if sid in ids:
                raise CorruptFile(f"{what}: id {sid!r} is used twice", path=self.path,
                                  offset=pos + 12)
            ids.add(sid)
            out.append(Snapshot(sid, _text(body[extra + id_len:]), l1_off, l1_size, dsec,
                                dnsec, clock, vmsize, disk_size, icount, extra, pos))
            pos += _SNAP_HEAD.size + len(body)
        return out

    # -- snapshots -----------------------------------------------------------------

    def vm_state_offset(self, snap: Snapshot) -> int:
        """Where the snapshot's VM state starts in its virtual address space: the
        first L1 slot past its disk size (``qcow2_vm_state_offset``)."""
        span = self.cluster_bits + self.l2_bits
        return -(-snap.disk_size >> span) << span

    def find(self, key: str | None) -> Snapshot:
        """The snapshot with id or tag ``key`` (an id wins, as in QEMU's
        ``bdrv_snapshot_find``); with None, the one snapshot holding VM state.

        :raise UsageError: no such snapshot, or None and not exactly one holds VM state.
        """
        with_state = [s for s in self.snapshots if s.has_vm_state]
        if key is None:
            if len(with_state) == 1:
                return with_state[0]
            if not with_state:
                raise UsageError(self._no_state_message())
            listed = ", ".join(f"{s.id} ({s.tag})" for s in with_state)
            raise UsageError(f"{self.path}: {len(with_state)} snapshots hold VM state; choose "
                             f"one with --snapshot ID|TAG: {listed}")
        for s in self.snapshots:
            if s.id == key:
                return s
        for s in self.snapshots:
            if s.tag == key:
                return s
        known = ", ".join(f"{s.id} ({s.tag})" for s in self.snapshots) or "none"
        raise UsageError(f"{self.path}: no snapshot with id or tag {key!r} (snapshots: {known})")

    def _no_state_message(self) -> str:
        if not self.snapshots:
            msg = f"{self.path}: the image has no internal snapshots, so no VM state"
        else:
            msg = (f"{self.path}: none of its {len(self.snapshots)} snapshots holds VM state "
                   "(disk-only snapshots)")
        if self.backing_file:
            msg += (f"; its backing file {self.backing_file} does not hold this image's "
                    "VM state (backing files never do)")
        return msg

    def vm_state(self, snap: Snapshot) -> SnapshotVMState:
        """The VM state of ``snap`` as a byte source (which shares this image's descriptor)."""
        if self.crypt_method:
            kind = {1: "AES", 2: "LUKS"}.get(self.crypt_method, str(self.crypt_method))
            raise UnsupportedFeature(f"the image is encrypted ({kind}), and its VM state with "
                                     "it; fixedram does not decrypt qcow2 images",
                                     path=self.path, offset=32)
        if not snap.has_vm_state:
            raise UsageError(f"{self.path}: snapshot {snap.id} ({snap.tag}) holds no VM state "
                             "(a disk-only snapshot)")
        return SnapshotVMState(self, snap)

    def data_fd(self) -> tuple[int, int, str]:
        """(descriptor, size, name) of the file holding the data clusters."""
        if self.data_file is None:
            return self.fd, self.file_size, self.path
        if self._data_fd < 0:
            p = os.path.join(os.path.dirname(self.path), self.data_file)
            try:
                self._data_fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                self._data_size = os.lseek(self._data_fd, 0, os.SEEK_END)
            except OSError as e:
                raise InputError(p, e) from e
            self._data_name = p
        return self._data_fd, self._data_size, self._data_name

    def close(self) -> None:
        for name in ("_data_fd", "fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Table:
    """One decoded L2 table: per cluster its kind, host offset and (extended L2)
    allocation bitmap; compressed clusters also their stored length."""

    kind: np.ndarray  # uint8, K_*
    host: np.ndarray  # int64
    alloc: np.ndarray | None  # uint32 subcluster allocation bits (extended L2)
    clen: np.ndarray  # int64: compressed bytes (K_COMPRESSED only)


class SnapshotVMState:
    """The VM state area of one internal snapshot: ``size`` bytes read through
    the snapshot's own L1/L2 tables. Zero and unallocated clusters read as
    zeros; compressed clusters are inflated (zlib or zstd, as the image says).

    Reads are positional and exact. Contiguous data clusters are read with one
    system call; :attr:`image_reads` counts the calls made on the image.

    :ivar name: ``IMAGE (snapshot TAG)``: offsets in errors about the stream
        are VM-state offsets; errors about the image's tables name the image.
    """

    def __init__(self, image: Qcow2Image, snap: Snapshot) -> None:
        self.image = image
        self.snapshot = snap
        self.name = f"{image.path} (snapshot {snap.label})"
        self.size = snap.vm_state_size
        self.fd: int | None = None  # offsets are not the image's: no kernel copy
        self.image_reads = 0
        self.cs = image.cluster_size
        self._span_bits = image.cluster_bits + image.l2_bits
        self.start = image.vm_state_offset(snap)
        self._tables: OrderedDict[int, _Table] = OrderedDict()
        self._inflated: tuple[int, bytes] | None = None  # (host offset, cluster)
        self._l1 = self._read_l1()

    def _read_l1(self) -> np.ndarray:
        """The L1 entries that map the VM state (not the whole table)."""
        img, snap = self.image, self.snapshot
        bad = None
        if snap.l1_table_offset % self.cs or snap.l1_table_offset == 0:
            bad = "is not cluster-aligned"
        elif snap.l1_size * 8 > MAX_L1_BYTES:
            bad = f"has {snap.l1_size} entries, more than QEMU's {MAX_L1_BYTES // 8}"
        elif snap.l1_table_offset + snap.l1_size * 8 > img.file_size:
            bad = f"runs past the end of the image ({img.file_size} bytes)"
        if bad is not None:
            raise CorruptFile(f"snapshot {snap.label}: its L1 table at "
                              f"{snap.l1_table_offset:#x} ({snap.l1_size} entries) {bad}",
                              path=img.path, offset=snap.entry_offset)
        first = self.start >> self._span_bits
        last = (self.start + self.size - 1) >> self._span_bits
        if last >= snap.l1_size:
            raise CorruptFile(f"snapshot {snap.label}: its L1 table ({snap.l1_size} entries) "
                              f"does not reach its VM state ({self.size} bytes from virtual "
                              f"offset {self.start:#x})", path=img.path,
                              offset=snap.entry_offset + 8)
        raw = img.read((last - first + 1) * 8, snap.l1_table_offset + first * 8,
                       f"the L1 table of snapshot {snap.label}")
        self.image_reads += 1
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    # -- L2 tables -------------------------------------------------------------------

    def _table(self, l1_index: int) -> _Table | None:
        """The decoded L2 table of one L1 slot; None where the slot is unallocated."""
        t = self._tables.get(l1_index)
        if t is not None:
            self._tables.move_to_end(l1_index)
            return t
        img = self.image
        rel = l1_index - (self.start >> self._span_bits)
        entry_at = self.snapshot.l1_table_offset + l1_index * 8
        l2_off = int(self._l1[rel]) & _OFFSET_MASK
        if l2_off == 0:
            return None
        if l2_off % self.cs:
            raise CorruptFile(f"L1 entry points at an L2 table at {l2_off:#x}, which is not "
                              "cluster-aligned", path=img.path, offset=entry_at)
        if l2_off + self.cs > img.file_size:
            raise CorruptFile(f"L1 entry points at an L2 table at {l2_off:#x}, past the end of "
                              f"the image ({img.file_size} bytes)", path=img.path,
                              offset=entry_at)
        raw = img.read(self.cs, l2_off, "an L2 table")
        self.image_reads += 1
        t = self._decode(np.frombuffer(raw, dtype=">u8").astype(np.uint64), l2_off, l1_index)
        self._tables[l1_index] = t
        if len(self._tables) > _L2_CACHE:
            self._tables.popitem(last=False)
        return t

    def _decode(self, words: np.ndarray, l2_off: int, l1_index: int) -> _Table:
        img = self.image
        ext = img.extended_l2
        w = words[0::2] if ext else words
        n = w.size
        # Only the clusters of the VM state are checked: the rest of the table is not read.
        base = l1_index << self._span_bits
        hi = min(n, -(-(self.start + self.size - base) // self.cs))
        comp = (w & np.uint64(_COMPRESSED)) != 0
        host = (w & np.uint64(_OFFSET_MASK)).astype(np.int64)
        kind = np.full(n, K_ZERO, dtype=np.uint8)
        alloc: np.ndarray | None = None
        if ext:
            bm = words[1::2]
            alloc = (bm & np.uint64(0xFFFFFFFF)).astype(np.uint32)
            zero = (bm >> np.uint64(32)).astype(np.uint32)
            both = np.flatnonzero(((alloc & zero) != 0)[:hi] & ~comp[:hi])
            if both.size:
                raise CorruptFile("extended L2 entry marks a subcluster both allocated and "
                                  "zero", path=img.path, offset=l2_off + int(both[0]) * 16 + 8)
            kind[(alloc == 0xFFFFFFFF) & ~comp] = K_DATA
            kind[(alloc != 0) & (alloc != 0xFFFFFFFF) & ~comp] = K_MIXED
        else:
            zero_flag = (w & np.uint64(1)) != 0
            kind[(host != 0) & ~zero_flag & ~comp] = K_DATA
        kind[comp] = K_COMPRESSED
        esz = img.l2_entry_size
        hosted = (kind[:hi] == K_DATA) | (kind[:hi] == K_MIXED)
        _dfd, dsize, dname = img.data_fd() if hosted.any() else (0, img.file_size, img.path)
        unhosted = np.flatnonzero(hosted & (host[:hi] == 0))
        if unhosted.size:
            raise CorruptFile("extended L2 entry has allocated subclusters but no cluster "
                              "offset", path=img.path, offset=l2_off + int(unhosted[0]) * esz)
        bad = np.flatnonzero(hosted & ((host[:hi] % self.cs) != 0))
        if bad.size:
            raise CorruptFile(f"L2 entry's cluster offset {int(host[bad[0]]):#x} is not "
                              "cluster-aligned", path=img.path, offset=l2_off + int(bad[0]) * esz)
        bad = np.flatnonzero(hosted & (host[:hi] >= dsize))
        if bad.size:
            raise CorruptFile(f"L2 entry points at cluster {int(host[bad[0]]):#x}, past the end "
                              f"of {dname} ({dsize} bytes)", path=img.path,
                              offset=l2_off + int(bad[0]) * esz)
        clen = np.zeros(n, dtype=np.int64)
        if comp[:hi].any():
            if img.data_file is not None:
                i = int(np.flatnonzero(comp[:hi])[0])
                raise CorruptFile("compressed cluster in an image with an external data file",
                                  path=img.path, offset=l2_off + i * esz)
            # Descriptor: x = 62 - (cluster_bits - 8) offset bits, then the count
            # of additional 512-byte sectors.
            x = 62 - (img.cluster_bits - 8)
            cmask = np.uint64((1 << (img.cluster_bits - 8)) - 1)
            coff = (w & np.uint64((1 << x) - 1)).astype(np.int64)
            nsec = ((w >> np.uint64(x)) & cmask).astype(np.int64) + 1
            host = np.where(comp, coff, host)
            clen = np.where(comp, nsec * 512 - (coff & 511), 0)
            bad = np.flatnonzero(comp[:hi] & (coff[:hi] >= img.file_size))
            if bad.size:
                raise CorruptFile(f"compressed cluster at {int(coff[bad[0]]):#x} is past the "
                                  f"end of the image ({img.file_size} bytes)", path=img.path,
                                  offset=l2_off + int(bad[0]) * esz)
        return _Table(kind, host, alloc, clen)

    # -- reads ---------------------------------------------------------------------

    def pread(self, n: int, offset: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise TruncatedFile(f"VM state ends at byte {self.size}: a {n}-byte read at "
                                f"{offset} runs past it", path=self.name,
                                offset=max(0, min(offset, self.size)))
        buf = bytearray(n)
        self._readinto(memoryview(buf), offset)
        return bytes(buf)

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        n = max(0, min(total, self.size - offset))
        if n == 0:
            return 0
        if len(views) == 1:
            self._readinto(views[0][:n], offset)
            return n
        tmp = memoryview(bytearray(n))
        self._readinto(tmp, offset)
        at = 0
        for v in views:
            k = min(len(v), n - at)
            v[:k] = tmp[at:at + k]
            at += k
            if at == n:
                break
        return n

    def allocated_bytes(self) -> int:
        """Image bytes the VM state occupies (data clusters, compressed lengths)."""
        total = 0
        span = 1 << self._span_bits
        first = self.start >> self._span_bits
        for i in range(self._l1.size):
            t = self._table(first + i)
            if t is None:
                continue
            lo = max(self.start, (first + i) * span) - (first + i) * span
            hi = min(self.start + self.size, (first + i + 1) * span) - (first + i) * span
            a, b = lo // self.cs, -(-hi // self.cs)
            k = t.kind[a:b]
            total += int(np.count_nonzero(k == K_DATA)) * self.cs
            total += int(t.clen[a:b][k == K_COMPRESSED].sum())
            if t.alloc is not None:
                mixed = t.alloc[a:b][k == K_MIXED]
                bits = np.unpackbits(mixed.view(np.uint8)).sum() if mixed.size else 0
                total += int(bits) * (self.cs // 32)
        return total

    def _readinto(self, out: memoryview, offset: int) -> None:
        """Fill ``out`` (within the VM state) from ``offset``."""
        span_bits = self._span_bits
        pos = self.start + offset  # virtual offset
        end = pos + len(out)
        o = 0  # position in out
        while pos < end:
            l1 = pos >> span_bits
            table_end = min(end, (l1 + 1) << span_bits)
            t = self._table(l1)
            if t is None:
                self._zero(out, o, table_end - pos)
            else:
                self._read_table(t, l1 << span_bits, pos, table_end, out, o)
            o += table_end - pos
            pos = table_end

    def _read_table(self, t: _Table, base: int, pos: int, end: int, out: memoryview,
                    o: int) -> None:
        cs = self.cs
        a, b = (pos - base) // cs, -(-(end - base) // cs)
        kind, host = t.kind[a:b], t.host[a:b]
        # Runs: clusters of one kind, data runs contiguous in the file;
        # compressed and mixed clusters each on their own.
        brk = (kind[1:] != kind[:-1]) | (kind[1:] >= K_COMPRESSED)
        brk |= (kind[1:] == K_DATA) & (host[1:] != host[:-1] + cs)
        bounds = [0, *(np.flatnonzero(brk) + 1).tolist(), b - a]
        kinds = kind.tolist()
        for r0, r1 in itertools.pairwise(bounds):
            lo = max(pos, base + (a + r0) * cs)
            hi = min(end, base + (a + r1) * cs)
            dst = o + lo - pos
            k = kinds[r0]
            into = (lo - base) % cs  # offset in the run's first cluster
            if k == K_ZERO:
                self._zero(out, dst, hi - lo)
            elif k == K_DATA:
                self._read_data(int(host[r0]) + into, out[dst:dst + hi - lo])
            elif k == K_COMPRESSED:
                data = self._inflate(t, a + r0, base)
                out[dst:dst + hi - lo] = data[into:into + hi - lo]
            else:
                assert t.alloc is not None
                self._read_mixed(int(host[r0]), int(t.alloc[a + r0]), into,
                                 out[dst:dst + hi - lo])

    def _read_data(self, at: int, view: memoryview) -> None:
        fd, _size, name = self.image.data_fd()
        got = 0
        while got < len(view):
            try:
                k = os.preadv(fd, [view[got:]], at + got)
            except OSError as e:
                raise InputError(name, e, offset=at + got) from e
            self.image_reads += 1
            if k == 0:
                # A cluster the file ends inside reads as zeros past the end, as
                # QEMU's file driver reads it.
                self._zero(view, got, len(view) - got)
                return
            got += k

    def _read_mixed(self, host: int, alloc: int, into: int, view: memoryview) -> None:
        sc = self.cs // 32
        pos = into
        end = into + len(view)
        while pos < end:
            i = pos // sc
            stop = min(end, (i + 1) * sc)
            if alloc >> i & 1:
                self._read_data(host + pos, view[pos - into:stop - into])
            else:
                self._zero(view, pos - into, stop - pos)
            pos = stop

    def _inflate(self, t: _Table, idx: int, base: int) -> bytes:
        host, clen = int(t.host[idx]), int(t.clen[idx])
        if self._inflated is not None and self._inflated[0] == host:
            return self._inflated[1]
        img = self.image
        # The sector count may run past the end of the file (the last cluster).
        n = min(clen, img.file_size - host)
        raw = img.read(n, host, "a compressed cluster")
        self.image_reads += 1
        where = base + idx * self.cs - self.start
        try:
            if img.compression_type == 1:
                import zstandard

                data = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
            else:
                data = zlib.decompressobj(-15).decompress(raw, self.cs)
        except (zlib.error, Exception) as e:
            raise CorruptFile(f"compressed cluster at {host:#x} (VM state byte {where}) does not "
                              f"decompress: {e}", path=img.path, offset=host) from None
        if len(data) < self.cs:
            raise CorruptFile(f"compressed cluster at {host:#x} inflates to {len(data)} bytes, "
                              f"not {self.cs}", path=img.path, offset=host)
        data = data[:self.cs]
        self._inflated = (host, data)
        return data

    @staticmethod
    def _zero(out: memoryview, at: int, n: int) -> None:
        np.frombuffer(out, dtype=np.uint8)[at:at + n] = 0

    def close(self) -> None:
        self.image.close()
