"""Device state decoded field by field through the vmdesc trailer.

QEMU describes every FULL device section in the vmdesc JSON while it saves
it (``migration/vmstate.c``): one entry per field with its ``name``, ``type``
and the ``size`` in bytes it wrote; ``array_len`` for an array described by
its first element only, ``index`` for an array whose elements are described
one by one, ``struct`` for a nested VMSD (``tmp``/``vstruct`` fields carry
the nested ``fields`` themselves), and ``subsections`` for the optional parts
that follow the fields, each framed in the stream as
``0x05 u8 len name be32 version``. Old-style (non-VMSD) devices are one
``data`` buffer. The configuration section is described the same way under
the top-level ``configuration`` key (QEMU 8.2 and later; 7.2 has none).

The description is untrusted input: every size and count is bounded by the
bytes left in the section, the nesting depth and the number of decoded
values are capped, and the walk must end exactly at the section's end.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

from ..errors import CorruptFile, TruncatedFile, UnsupportedFeature
from .constants import SectionType

if TYPE_CHECKING:
    from .walker import Save

__all__ = ["DeviceState", "decode_configuration", "decode_devices", "decode_section",
           "jsonable"]

_MAX_DEPTH = 32
# Values decoded per section beyond one per data byte (zero-size fields exist).
_BUDGET_SLACK = 4096
_SUBSECTION = SectionType.SUBSECTION
# The 1-byte marker QEMU writes for an element of a pointer array: '0' for a
# NULL element; '1' (auto-allocated arrays) when the element itself follows
# as the next vmdesc entry of the same name. The vmdesc type is "nullptr" up
# to QEMU 11.0 (only '0' exists), "ptr-marker" after it.
_PTR_NULL, _PTR_PRESENT = 0x30, 0x31
_PTR_MARKER_BYTES = {"nullptr": bytes([_PTR_NULL]), "ptr-marker": bytes([_PTR_NULL, _PTR_PRESENT])}
_PTR_VALID = object()  # what a '1' marker decodes to: no value, the next entry holds it

# vmstate integer types: (width in bytes, signed). Big-endian on the wire.
_INT_TYPES: dict[str, tuple[int, bool]] = {
    "int8": (1, True), "int16": (2, True), "int32": (4, True), "int64": (8, True),
    "uint8": (1, False), "uint16": (2, False), "uint32": (4, False), "uint64": (8, False),
    "int32 equal": (4, True), "int32 le": (4, True),
    "uint8 equal": (1, False), "uint16 equal": (2, False), "uint32 equal": (4, False),
    "int64 equal": (8, False),  # QEMU's uint64-equal check carries this name
    "timer": (8, True),  # expiry in ns, -1 when the timer is not armed
}
_STRUCT_CODE = {(1, True): "b", (1, False): "B", (2, True): "h", (2, False): "H",
                (4, True): "i", (4, False): "I", (8, True): "q", (8, False): "Q"}
_FLOAT_TYPES = frozenset({"float64", "CPU_Double_U"})
# Types whose put() writes a nested VMSD description into the field's own entry.
_NESTED_TYPES = frozenset({"tmp", "vstruct"})


@dataclass
class DeviceState:
    """One device (FULL) section, decoded.

    :ivar offset: absolute file offset of the section's data.
    :ivar fields: vmdesc field name -> value: int, bool, float, bytes (buffers
        and uint8 arrays), str (capability names), None (null pointers),
        list (arrays), dict (structs; subsections under their ``vmsd_name``).
    """

    section_id: int
    name: str
    instance_id: int
    version_id: int
    offset: int
    fields: dict[str, Any]


# A struct of plain fields decoded in one unpack: field names, struct codes, size in bytes.
_Plan = tuple[tuple[str, ...], str, int]


class _Walk:
    """One pass over a section's bytes along its vmdesc entry."""

    __slots__ = ("base", "budget", "data", "path", "plans", "pos", "who")

    def __init__(self, data: bytes, base: int, path: str | None, who: str) -> None:
        self.data = data
        self.pos = 0
        self.plans: dict[int, tuple[Any, _Plan | None]] = {}
        self.base = base
        self.path = path
        self.who = who
        self.budget = len(data) + _BUDGET_SLACK

    def fail(self, msg: str, at: int | None = None) -> CorruptFile:
        where = self.pos if at is None else at
        return CorruptFile(f"{self.who}: {msg}", path=self.path, offset=self.base + where)

    def vmsd(self, desc: Any, end: int, depth: int) -> dict[str, Any]:
        if depth > _MAX_DEPTH:
            raise self.fail(f"vmdesc nests deeper than {_MAX_DEPTH} levels")
        if not isinstance(desc, Mapping):
            raise self.fail("vmdesc entry is not an object")
        fields = desc.get("fields", [])
        subs = desc.get("subsections", [])
        if not isinstance(fields, list) or not isinstance(subs, list):
            raise self.fail("vmdesc entry has a malformed field or subsection list")
        out: dict[str, Any] = {}
        for f in fields:
            self.field(f, out, end, depth)
        for s in subs:
            name, value = self.subsection(s, end, depth)
            if name in out:
                raise self.fail(f"vmdesc names {name!r} twice")
            out[name] = value
        return out

    def subsection(self, s: Any, end: int, depth: int) -> tuple[str, dict[str, Any]]:
        if not isinstance(s, Mapping) or not isinstance(s.get("vmsd_name"), str):
            raise self.fail("vmdesc subsection entry has no vmsd_name")
        want = s["vmsd_name"]
        data, pos = self.data, self.pos
        if pos >= end or data[pos] != _SUBSECTION:
            got = "the end of the section" if pos >= end else f"byte 0x{data[pos]:02x}"
            raise self.fail(f"subsection {want!r} described by the vmdesc is not in the stream "
                            f"(found {got})")
        if pos + 2 > end or pos + 2 + data[pos + 1] + 4 > end:
            raise self.fail(f"subsection {want!r} header runs past the end of the section")
        n = data[pos + 1]
        name = data[pos + 2:pos + 2 + n]
        if name != want.encode():
            raise self.fail(f"subsection {_text(name)!r} in the stream where the vmdesc has "
                            f"{want!r}")
        version = int.from_bytes(data[pos + 2 + n:pos + 6 + n], "big")
        dv = s.get("version")
        if _is_int(dv) and dv != version:
            raise self.fail(f"subsection {want!r} has version {version} in the stream, "
                            f"{dv} in the vmdesc")
        self.pos = pos + 6 + n
        self.budget -= 1
        return want, self.vmsd(s, end, depth + 1)

    def field(self, f: Any, out: dict[str, Any], end: int, depth: int) -> None:
        if not isinstance(f, Mapping):
            raise self.fail("vmdesc field entry is not an object")
        name, typ, size = f.get("name"), f.get("type", "unknown"), f.get("size")
        arr, idx = f.get("array_len"), f.get("index")
        if (not isinstance(name, str) or not isinstance(typ, str) or not _is_int(size)
                or size < 0 or (arr is not None and (not _is_int(arr) or arr < 0))
                or (idx is not None and not _is_int(idx))):
            raise self.fail(f"vmdesc field entry {str(name)[:60]!r} is malformed")
        count = 1 if arr is None else arr
        self.budget -= count + 1
        if self.budget < 0:
            raise self.fail("vmdesc describes more values than the section can hold")
        value = self.values(f, name, typ, size, count, arr is not None, end, depth)
        if value is _PTR_VALID:
            return  # the element follows under the same name
        if idx is not None:  # one element of an array QEMU could not describe compactly
            if name not in out:
                out[name] = [value]
            elif isinstance(out[name], list):
                out[name].append(value)
            else:
                out[name] = [out[name], value]
        elif name in out:  # repeated name: array segments, merged as analyze-migration does
            cur = out[name] if isinstance(out[name], list) else [out[name]]
            if isinstance(value, list):
                cur.extend(value)
            else:
                cur.append(value)
            out[name] = cur
        else:
            out[name] = value

    def values(self, f: Mapping[str, Any], name: str, typ: str, size: int, count: int,
               is_array: bool, end: int, depth: int) -> Any:
        if typ == "capability":  # u8 length + name: variable size, 'size' is the first one's
            caps = [self.capability(name, end) for _ in range(count)]
            return caps if is_array else caps[0]
        total = size * count
        pos = self.pos
        if total > end - pos:
            raise self.fail(f"field {name!r} needs {total} bytes but {end - pos} are left")
        data = self.data
        out: list[Any]
        if typ == "struct" or (typ in _NESTED_TYPES and "fields" in f):
            sub = f.get("struct") if typ == "struct" else f
            if count > 1 and depth < _MAX_DEPTH:
                plan = self.plan(sub, size)
                if plan is not None:
                    return self.flat_structs(plan, pos, count)
            out = [self.window(sub, name, size, depth) for _ in range(count)]
            return out if is_array else out[0]
        self.pos = pos + total
        kind = _INT_TYPES.get(typ)
        if kind is not None:
            width = kind[0]
            if size == width:
                if typ == "uint8" and is_array:
                    return data[pos:pos + total]
                vals = struct.unpack_from(f">{count}{_STRUCT_CODE[kind]}", data, pos)
                return list(vals) if is_array else vals[0]
            if size == 1 and data[pos:pos + total] == b"0" * count:
                out = [None] * count  # NULL elements of a pointer array
                return out if is_array else None
        elif typ == "bool" and size == 1:
            out = [b != 0 for b in data[pos:pos + total]]
            return out if is_array else out[0]
        elif typ in _FLOAT_TYPES and size == 8:
            vals = struct.unpack_from(f">{count}d", data, pos)
            return list(vals) if is_array else vals[0]
        elif typ in _PTR_MARKER_BYTES:
            return self.ptr_markers(name, typ, size, count, is_array, pos)
        elif typ == "pci irq state" and size % 4 == 0:
            n = size // 4
            out = [list(struct.unpack_from(f">{n}i", data, pos + i * size))
                   for i in range(count)]
            return out if is_array else out[0]
        # buffers, bitmaps, PCI config space, virtio, unknown types: the raw bytes
        out = [data[pos + i * size:pos + (i + 1) * size] for i in range(count)]
        return out if is_array else out[0]

    def ptr_markers(self, name: str, typ: str, size: int, count: int, is_array: bool,
                    pos: int) -> Any:
        """``count`` pointer markers at ``pos``: None for each NULL element.

        QEMU writes each marker as one byte and describes a run of them with
        one entry; a '1' (ptr-marker only) announces the element that follows
        it, so it contributes nothing itself. The loader refuses any other byte.
        """
        if size != 1:
            raise self.fail(f"field {name!r}: a pointer marker ({typ}) is 1 byte, the vmdesc "
                            f"says {size}", at=pos)
        raw = self.data[pos:pos + count]
        allowed = _PTR_MARKER_BYTES[typ]
        for i, b in enumerate(raw):
            if b not in allowed:
                want = " or ".join(repr(chr(c)) for c in allowed)
                raise self.fail(f"field {name!r}: pointer marker ({typ}) is 0x{b:02x}, not {want}",
                                at=pos + i)
        if _PTR_PRESENT in raw:
            if count != 1:
                # QEMU never compresses an auto-allocated array: each '1' has its own entry.
                raise self.fail(f"field {name!r}: '1' in a run of {count} pointer markers",
                                at=pos)
            return _PTR_VALID
        return [None] * count if is_array else None

    def plan(self, desc: Any, size: int) -> _Plan | None:
        """One unpack format for a struct of plain integers and bools that fill its
        ``size``, or None (anything else takes the field-by-field path, which also
        reports what is malformed)."""
        hit = self.plans.get(id(desc))
        if hit is not None:
            return hit[1]
        plan: _Plan | None = None
        fields = desc.get("fields") if isinstance(desc, Mapping) else None
        if isinstance(fields, list) and fields and not desc.get("subsections"):
            names: list[str] = []
            codes = []
            width = 0
            for f in fields:
                if not isinstance(f, Mapping) or set(f) - {"name", "type", "size"}:
                    break
                name, typ, fsize = f.get("name"), f.get("type"), f.get("size")
                kind = _INT_TYPES.get(typ) if isinstance(typ, str) else None
                if not isinstance(name, str) or name in names or not _is_int(fsize):
                    break
                if kind is not None and kind[0] == fsize:
                    codes.append(_STRUCT_CODE[kind])
                elif typ == "bool" and fsize == 1:
                    codes.append("?")
                else:
                    break
                names.append(name)
                width += fsize
            else:
                if width == size:
                    plan = (tuple(names), "".join(codes), size)
        self.plans[id(desc)] = (desc, plan)
        return plan

    def flat_structs(self, plan: _Plan, pos: int, count: int) -> list[dict[str, Any]]:
        """``count`` structs of ``plan`` at ``pos`` in one unpack: what the
        field-by-field path gives for them, at a fraction of the cost (arrays of
        small structs, such as AHCI's NCQ slots, hold most of a device's fields)."""
        names, codes, size = plan
        self.budget -= count * 2 * len(names)
        if self.budget < 0:
            raise self.fail("vmdesc describes more values than the section can hold")
        k = len(names)
        vals = struct.unpack_from(">" + codes * count, self.data, pos)
        self.pos = pos + size * count
        return [dict(zip(names, vals[i * k:(i + 1) * k], strict=True)) for i in range(count)]

    def window(self, desc: Any, name: str, size: int, depth: int) -> dict[str, Any]:
        start = self.pos
        value = self.vmsd(desc, start + size, depth + 1)
        if self.pos != start + size:
            raise self.fail(f"struct field {name!r} is {size} bytes in the vmdesc but its "
                            f"fields take {self.pos - start}", at=start)
        return value

    def capability(self, name: str, end: int) -> str:
        pos = self.pos
        if pos >= end or pos + 1 + self.data[pos] > end:
            raise self.fail(f"field {name!r}: capability name runs past the end of the section")
        n = self.data[pos]
        self.pos = pos + 1 + n
        return _text(self.data[pos + 1:pos + 1 + n])


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="backslashreplace")


def decode_section(desc: Mapping[str, Any], data: bytes, *, who: str, offset: int = 0,
                   path: str | None = None) -> dict[str, Any]:
    """Decode one section's data through its vmdesc entry.

    :param desc: the vmdesc entry (``fields``, optional ``subsections``).
    :param data: exactly the section's data bytes.
    :param who: names the section in errors, e.g. ``device 'cpu' instance 0``.
    :param offset: absolute file offset of ``data[0]``, for error offsets.
    :raise CorruptFile: the bytes do not follow the description, or bytes are
        left over or missing.
    """
    w = _Walk(data, offset, path, who)
    fields = w.vmsd(desc, len(data), 0)
    if w.pos != len(data):
        pos = w.pos
        if data[pos] == _SUBSECTION and pos + 2 <= len(data):
            name = _text(data[pos + 2:pos + 2 + data[pos + 1]])
            raise w.fail(f"subsection {name!r} in the stream is not described by the vmdesc")
        raise w.fail(f"{len(data) - pos} bytes left over after the fields the vmdesc describes")
    return fields


def _pread(mf: Save, offset: int, n: int, what: str) -> bytes:
    try:
        return mf.source.pread(n, offset)
    except TruncatedFile:
        raise TruncatedFile(f"file ends inside {what}: needed {n} bytes", path=mf.path,
                            offset=offset) from None


def _device_descs(mf: Save) -> dict[tuple[str, int], Mapping[str, Any]]:
    assert mf.vmdesc is not None
    devices = mf.vmdesc.doc.get("devices", [])
    if not isinstance(devices, list):
        raise CorruptFile("vmdesc 'devices' is not a list", path=mf.path,
                          offset=mf.vmdesc.offset + 5)
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    for d in devices:
        if isinstance(d, Mapping):
            name, inst = d.get("name"), d.get("instance_id")
            if isinstance(name, str) and _is_int(inst):
                out.setdefault((name, inst), d)
    return out


def decode_devices(mf: Save) -> list[DeviceState]:
    """Every device (FULL) section of ``mf`` decoded, in stream order; RAM is not one.

    :raise UnsupportedFeature: the file has device sections but no vmdesc trailer.
    :raise CorruptFile: a section disagrees with its vmdesc entry, or has none.
    """
    secs = mf.sections
    if not secs:
        return []
    if mf.vmdesc is None:
        raise UnsupportedFeature("the file has no vmdesc trailer: device sections cannot be "
                                 "decoded field by field", path=mf.path,
                                 offset=secs[0].offset)
    descs = _device_descs(mf)
    out: list[DeviceState] = []
    for s in secs:
        who = f"device {s.idstr!r} instance {s.instance_id}"
        desc = descs.get((s.idstr, s.instance_id))
        if desc is None:
            raise CorruptFile(f"{who}: the vmdesc does not describe this section", path=mf.path,
                              offset=s.offset)
        dv, size = desc.get("version"), desc.get("size")
        if _is_int(dv) and dv != s.version_id:
            raise CorruptFile(f"{who}: version {s.version_id} in the stream, {dv} in the vmdesc",
                              path=mf.path, offset=s.offset)
        if _is_int(size) and size != s.data_length:  # old-style devices state their size
            raise CorruptFile(f"{who}: {s.data_length} data bytes in the stream, {size} in the "
                              "vmdesc", path=mf.path, offset=s.data_offset)
        data = _pread(mf, s.data_offset, s.data_length, f"device section {s.idstr!r}")
        fields = decode_section(desc, data, who=who, offset=s.data_offset, path=mf.path)
        out.append(DeviceState(s.section_id, s.idstr, s.instance_id, s.version_id,
                               s.data_offset, fields))
    return out


def decode_configuration(mf: Save) -> dict[str, Any]:
    """The configuration section: ``len``, ``name`` (the machine type, as text) and its
    subsections (``configuration/capabilities`` with ``caps_count`` and the list
    ``capabilities``; ``configuration/target-page-bits``; ``configuration/uuid``).

    Decoded through the vmdesc ``configuration`` entry when there is one (QEMU
    8.2 and later); otherwise rebuilt from the stream header's parsed facts.
    An empty dict when the stream has no configuration section.

    :raise CorruptFile: the vmdesc entry and the section's bytes disagree
        (a subsection in one and not in the other, for example).
    """
    hdr = mf.header
    desc = mf.vmdesc.doc.get("configuration") if mf.vmdesc is not None else None
    start = hdr.offset + 9  # after the magic, the version and the 0x07 byte
    if hdr.machine is None:
        if desc is not None:
            raise CorruptFile("configuration: the vmdesc describes a configuration section "
                              "but the stream has none", path=mf.path, offset=hdr.offset + 8)
        return {}
    if desc is None:
        return _config_from_header(mf)
    data = _pread(mf, start, hdr.end - start, "the configuration section")
    fields = decode_section(desc, data, who="configuration", offset=start, path=mf.path)
    return _tidy_config(fields, mf, start)


def _config_from_header(mf: Save) -> dict[str, Any]:
    hdr = mf.header
    assert hdr.machine is not None
    out: dict[str, Any] = {"len": len(hdr.machine.encode()), "name": hdr.machine}
    if hdr.target_page_bits is not None:
        out["configuration/target-page-bits"] = {"target_page_bits": hdr.target_page_bits}
    if hdr.capabilities:
        out["configuration/capabilities"] = {"caps_count": len(hdr.capabilities),
                                             "capabilities": list(hdr.capabilities)}
    if hdr.uuid is not None:
        out["configuration/uuid"] = {"uuid.data": hdr.uuid}
    return out


def _tidy_config(fields: dict[str, Any], mf: Save, start: int) -> dict[str, Any]:
    """The machine name as text and the capabilities as a list, checked for consistency."""
    name = fields.get("name")
    if isinstance(name, bytes):
        fields["name"] = _text(name)
        if fields.get("len") != len(name):
            raise CorruptFile(f"configuration: name length {fields.get('len')} but the vmdesc "
                              f"describes {len(name)} bytes", path=mf.path, offset=start)
    caps = fields.get("configuration/capabilities")
    if isinstance(caps, dict) and "capabilities" in caps:
        lst = caps["capabilities"]
        caps["capabilities"] = lst = lst if isinstance(lst, list) else [lst]
        if caps.get("caps_count") != len(lst):
            raise CorruptFile(f"configuration: caps_count {caps.get('caps_count')} but "
                              f"{len(lst)} capabilities", path=mf.path, offset=start)
    return fields


def jsonable(value: Any) -> Any:
    """A decoded value in JSON terms: bytes as hex strings, non-finite floats as text."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
