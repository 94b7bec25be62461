"""The QAPI schema of the QMP commands fixedram implements, as QEMU 10.0 has it.

One description serves three purposes, so they cannot disagree:

* arguments are checked before a command runs, with the messages of QEMU's
  QObject input visitor ("Invalid parameter type for 'capabilities[0].state',
  expected: boolean", "Parameter 'multifd-channels' expects uint8_t", ...);
* ``query-qmp-schema`` answers in QEMU's introspection format (type names
  masked as numbers, integer kinds shown as ``int``), describing exactly the
  commands and events served here;
* ``query-commands`` lists the same commands.

The schema is written in a small notation: a member is ``name[?]:type``
(``?`` = optional) with ``:feature`` suffixes, ``[T]`` is an array of T.
Integer kinds (int, int64, uint8, uint16, uint32, uint64, size) are kept for
the range checks; introspection shows them all as ``int``, as QEMU does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import FixedramError

__all__ = ["COMMANDS", "EVENTS", "QAPIError", "check_arguments", "introspect"]


class QAPIError(FixedramError):
    """A command's error answer: QEMU's error class and message."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


# -- the notation ---------------------------------------------------------------

_INTS = {"int": None, "int64": None, "uint8": 0xFF, "uint16": 0xFFFF, "uint32": 0xFFFFFFFF,
         "uint64": None, "size": None}
_BUILTIN_JSON = {"str": "string", "bool": "boolean", "number": "number", "any": "value",
                 "null": "null", "int": "int"}


@dataclass
class Member:
    name: str
    type: str
    optional: bool = False
    features: tuple[str, ...] = ()


@dataclass
class Enum:
    name: str
    values: list[str]
    features: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class Struct:
    """An object; a flat union when ``tag`` is set (``variants``: case -> type)."""

    name: str
    members: list[Member]
    tag: str | None = None
    variants: dict[str, str] = field(default_factory=dict)


@dataclass
class Alternate:
    name: str
    types: list[str]


@dataclass
class Command:
    name: str
    arg: str
    ret: str
    features: tuple[str, ...] = ()


@dataclass
class Event:
    name: str
    arg: str


TYPES: dict[str, Enum | Struct | Alternate] = {}
COMMANDS: dict[str, Command] = {}
EVENTS: dict[str, Event] = {}
_EMPTY = "q_empty"


def _members(spec: str) -> list[Member]:
    out = []
    for item in spec.split():
        name, typ, *features = item.split(":")
        opt = name.endswith("?")
        out.append(Member(name.rstrip("?"), typ, opt, tuple(features)))
    return out


def _enum(name: str, spec: str) -> None:
    values, feats = [], {}
    for item in spec.split():
        v, *f = item.split(":")
        values.append(v)
        if f:
            feats[v] = tuple(f)
    TYPES[name] = Enum(name, values, feats)


def _struct(name: str, spec: str = "", tag: str | None = None,
            variants: dict[str, str] | None = None) -> None:
    TYPES[name] = Struct(name, _members(spec), tag, variants or {})


def _command(name: str, arg: str = "", ret: str = _EMPTY, features: tuple[str, ...] = (),
             arg_type: str | None = None) -> None:
    if arg_type is None:
        arg_type = _EMPTY
        if arg:
            arg_type = f"q_obj_{name}-arg"
            _struct(arg_type, arg)
    COMMANDS[name] = Command(name, arg_type, ret, features)


def _event(name: str, arg: str = "") -> None:
    arg_type = _EMPTY
    if arg:
        arg_type = f"q_obj_{name}-arg"
        _struct(arg_type, arg)
    EVENTS[name] = Event(name, arg_type)


# -- QEMU 10.0's types, for the commands served here --------------------------------

_struct(_EMPTY)
_enum("RunState", "debug inmigrate internal-error io-error paused postmigrate prelaunch "
      "finish-migrate restore-vm running save-vm shutdown suspended watchdog guest-panicked "
      "colo")
_enum("ShutdownCause", "none host-error host-qmp-quit host-qmp-system-reset host-signal "
      "host-ui guest-shutdown guest-reset guest-panic subsystem-reset snapshot-load")
_struct("StatusInfo", "running:bool status:RunState")
_struct("VersionTriple", "major:int minor:int micro:int")
_struct("VersionInfo", "qemu:VersionTriple package:str")
_struct("CommandInfo", "name:str")
_enum("QMPCapability", "oob")
_enum("MigrationStatus", "none setup cancelling cancelled active postcopy-active "
      "postcopy-paused postcopy-recover-setup postcopy-recover completed failed colo "
      "pre-switchover device wait-unplug")
_enum("MigrationCapability", "xbzrle rdma-pin-all auto-converge zero-blocks:deprecated "
      "events postcopy-ram x-colo:unstable release-ram return-path pause-before-switchover "
      "multifd dirty-bitmaps postcopy-blocktime late-block-activate x-ignore-shared:unstable "
      "validate-uuid background-snapshot zero-copy-send postcopy-preempt switchover-ack "
      "dirty-limit mapped-ram")
_struct("MigrationCapabilityStatus", "capability:MigrationCapability state:bool")
_enum("MultiFDCompression", "none zlib zstd")
_enum("MigMode", "normal cpr-reboot cpr-transfer")
_enum("ZeroPageDetection", "none legacy multifd")
_struct("BitmapMigrationBitmapAliasTransform", "persistent?:bool")
_struct("BitmapMigrationBitmapAlias",
        "name:str alias:str transform?:BitmapMigrationBitmapAliasTransform")
_struct("BitmapMigrationNodeAlias", "node-name:str alias:str bitmaps:[BitmapMigrationBitmapAlias]")
_TLS_STR = "tls-creds?:{0} tls-hostname?:{0} tls-authz?:{0}"
_PARAMS = ("announce-initial?:size announce-max?:size announce-rounds?:size "
           "announce-step?:size throttle-trigger-threshold?:uint8 cpu-throttle-initial?:uint8 "
           "cpu-throttle-increment?:uint8 cpu-throttle-tailslow?:bool {tls} "
           "max-bandwidth?:size avail-switchover-bandwidth?:size downtime-limit?:uint64 "
           "x-checkpoint-delay?:uint32:unstable multifd-channels?:uint8 "
           "xbzrle-cache-size?:size max-postcopy-bandwidth?:size max-cpu-throttle?:uint8 "
           "multifd-compression?:MultiFDCompression multifd-zlib-level?:uint8 "
           "multifd-qatzip-level?:uint8 multifd-zstd-level?:uint8 "
           "block-bitmap-mapping?:[BitmapMigrationNodeAlias] "
           "x-vcpu-dirty-limit-period?:uint64:unstable vcpu-dirty-limit?:uint64 "
           "mode?:MigMode zero-page-detection?:ZeroPageDetection direct-io?:bool")
TYPES["StrOrNull"] = Alternate("StrOrNull", ["str", "null"])
_struct("MigrateSetParameters", _PARAMS.format(tls=_TLS_STR.format("StrOrNull")))
_struct("MigrationParameters", _PARAMS.format(tls=_TLS_STR.format("str")))
_struct("MigrationStats", "transferred:int remaining:int total:int duplicate:int normal:int "
        "normal-bytes:int dirty-pages-rate:int mbps:number dirty-sync-count:int "
        "postcopy-requests:int page-size:int multifd-bytes:uint64 pages-per-second:uint64 "
        "precopy-bytes:uint64 downtime-bytes:uint64 postcopy-bytes:uint64 "
        "dirty-sync-missed-zero-copy:uint64")
_struct("VfioStats", "transferred:int")
_struct("XBZRLECacheStats", "cache-size:size bytes:int pages:int cache-miss:int "
        "cache-miss-rate:number encoding-rate:number overflow:int")
_enum("SocketAddressType", "inet unix vsock fd")
_struct("InetSocketAddress", "host:str port:str numeric?:bool to?:uint16 ipv4?:bool ipv6?:bool "
        "keep-alive?:bool mptcp?:bool")
_struct("UnixSocketAddress", "path:str abstract?:bool tight?:bool")
_struct("VsockSocketAddress", "cid:str port:str")
_struct("FdSocketAddress", "str:str")
_struct("SocketAddress", "type:SocketAddressType", tag="type", variants={
    "inet": "InetSocketAddress", "unix": "UnixSocketAddress", "vsock": "VsockSocketAddress",
    "fd": "FdSocketAddress"})
_struct("MigrationInfo", "status?:MigrationStatus ram?:MigrationStats vfio?:VfioStats "
        "xbzrle-cache?:XBZRLECacheStats total-time?:int expected-downtime?:int downtime?:int "
        "setup-time?:int cpu-throttle-percentage?:int error-desc?:str blocked-reasons?:[str] "
        "postcopy-blocktime?:uint32 postcopy-vcpu-blocktime?:[uint32] "
        "socket-address?:[SocketAddress] dirty-limit-throttle-time-per-round?:uint64 "
        "dirty-limit-ring-full-time?:uint64")
_enum("MigrationAddressType", "socket exec rdma file")
_struct("MigrationExecCommand", "args:[str]")
_struct("FileMigrationArgs", "filename:str offset:uint64")
_struct("MigrationAddress", "transport:MigrationAddressType", tag="transport", variants={
    "socket": "SocketAddress", "exec": "MigrationExecCommand", "rdma": "InetSocketAddress",
    "file": "FileMigrationArgs"})
_enum("MigrationChannelType", "main cpr")
_struct("MigrationChannel", "channel-type:MigrationChannelType addr:MigrationAddress")
_struct("AddfdInfo", "fdset-id:int fd:int")
_struct("FdsetFdInfo", "fd:int opaque?:str")
_struct("FdsetInfo", "fdset-id:int fds:[FdsetFdInfo]")
# query-qmp-schema describes its own answer too.
_enum("SchemaMetaType", "builtin enum array object alternate command event")
_enum("JSONType", "string number int boolean null object array value")
_struct("SchemaInfoBuiltin", "json-type:JSONType")
_struct("SchemaInfoEnumMember", "name:str features?:[str]")
_struct("SchemaInfoEnum", "members:[SchemaInfoEnumMember] values:[str]:deprecated")
_struct("SchemaInfoArray", "element-type:str")
_struct("SchemaInfoObjectMember", "name:str type:str default?:any features?:[str]")
_struct("SchemaInfoObjectVariant", "case:str type:str")
_struct("SchemaInfoObject", "members:[SchemaInfoObjectMember] tag?:str "
        "variants?:[SchemaInfoObjectVariant]")
_struct("SchemaInfoAlternateMember", "type:str")
_struct("SchemaInfoAlternate", "members:[SchemaInfoAlternateMember]")
_struct("SchemaInfoCommand", "arg-type:str ret-type:str allow-oob?:bool")
_struct("SchemaInfoEvent", "arg-type:str")
_struct("SchemaInfo", "name:str meta-type:SchemaMetaType features?:[str]", tag="meta-type",
        variants={"builtin": "SchemaInfoBuiltin", "enum": "SchemaInfoEnum",
                  "array": "SchemaInfoArray", "object": "SchemaInfoObject",
                  "alternate": "SchemaInfoAlternate", "command": "SchemaInfoCommand",
                  "event": "SchemaInfoEvent"})

# -- the commands and events served, in QEMU's spelling -----------------------------

_command("qmp_capabilities", "enable?:[QMPCapability]")
_command("query-status", ret="StatusInfo")
_command("query-version", ret="VersionInfo")
_command("query-commands", ret="[CommandInfo]")
_command("query-qmp-schema", ret="[SchemaInfo]")
_command("stop")
_command("cont")
_command("quit")
_command("human-monitor-command", "command-line:str cpu-index?:int", ret="str",
         features=("savevm-monitor-nodes",))
_command("getfd", "fdname:str")
_command("closefd", "fdname:str")
_command("add-fd", "fdset-id?:int opaque?:str", ret="AddfdInfo")
_command("remove-fd", "fdset-id:int fd?:int")
_command("query-fdsets", ret="[FdsetInfo]")
_command("migrate-set-capabilities", "capabilities:[MigrationCapabilityStatus]")
_command("query-migrate-capabilities", ret="[MigrationCapabilityStatus]")
_command("migrate-set-parameters", arg_type="MigrateSetParameters")
_command("query-migrate-parameters", ret="MigrationParameters")
_command("migrate", "uri?:str channels?:[MigrationChannel] detach?:bool resume?:bool")
_command("migrate-incoming", "uri?:str channels?:[MigrationChannel] exit-on-error?:bool")
_command("migrate_cancel")
_command("migrate-continue", "state:MigrationStatus")
_command("query-migrate", ret="MigrationInfo")
# fixedram's own (x- as QEMU names unstable commands): BLAKE2b of guest RAM.
_struct("x-RamDigest", "digest:str seq:int")
_command("x-query-ram-digest", ret="x-RamDigest")

_event("SHUTDOWN", "guest:bool reason:ShutdownCause")
_event("STOP")
_event("RESUME")
_event("MIGRATION", "status:MigrationStatus")
_event("MIGRATION_PASS", "pass:int")


# -- argument checks: QEMU's QObject input visitor -------------------------------------

def check_arguments(command: str, args: dict[str, Any]) -> None:
    """Raise :class:`QAPIError` with QEMU's words for arguments that do not fit."""
    _check_object(TYPES[COMMANDS[command].arg], args, "")


def _full(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _bad_type(path: str, what: str) -> QAPIError:
    return QAPIError(f"Invalid parameter type for '{path}', expected: {what}")


def _check(typ: str, v: Any, path: str, name: str) -> None:
    if typ.startswith("["):
        if not isinstance(v, list):
            raise _bad_type(path, "array")
        for i, item in enumerate(v):
            _check(typ[1:-1], item, f"{path}[{i}]", name)
    elif typ in _INTS:
        _check_int(typ, v, path, name)
    elif typ == "str":
        if not isinstance(v, str):
            raise _bad_type(path, "string")
    elif typ == "bool":
        if not isinstance(v, bool):
            raise _bad_type(path, "boolean")
    elif typ == "number":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad_type(path, "number")
    elif typ == "any":
        pass
    else:
        t = TYPES[typ]
        if isinstance(t, Enum):
            if not isinstance(v, str):
                raise _bad_type(path, "string")
            if v not in t.values:  # QEMU names the member, not the path, here
                raise QAPIError(f"Parameter '{name}' does not accept value '{v}'")
        elif isinstance(t, Alternate):
            kinds: dict[str, type] = {"str": str, "null": type(None)}
            if not any(isinstance(v, kinds[k]) for k in t.types):
                raise _bad_type(path, t.name)
        else:
            if not isinstance(v, dict):
                raise _bad_type(path, "object")
            _check_object(t, v, path)


def _check_int(typ: str, v: Any, path: str, name: str) -> None:
    # JSON integers beyond 64 bits arrive as floats (QEMU keeps them as doubles).
    is_int = isinstance(v, int) and not isinstance(v, bool)
    if typ in ("int", "int64"):
        if not is_int or not -(1 << 63) <= v < (1 << 63):
            raise _bad_type(path, "integer")
        return
    # Unsigned: read as uint64, negative values accepted for backward
    # compatibility (as their two's complement), then narrowed.
    if not is_int or not -(1 << 63) <= v < (1 << 64):
        raise QAPIError(f"Parameter '{path}' expects uint64")
    limit = _INTS[typ]
    if limit is not None and (v < 0 or v > limit):
        raise QAPIError(f"Parameter '{name}' expects {typ}_t")


def _struct_members(t: Struct, v: dict[str, Any], path: str) -> list[Member]:
    """The members an object must have; a union's tag is checked first."""
    if t.tag is None:
        return t.members
    members = list(t.members)
    tag = next(m for m in members if m.name == t.tag)
    if t.tag not in v:
        raise QAPIError(f"Parameter '{_full(path, t.tag)}' is missing")
    _check(tag.type, v[t.tag], _full(path, t.tag), t.tag)
    variant = TYPES[t.variants[v[t.tag]]]
    assert isinstance(variant, Struct)
    return members + [m for m in _struct_members(variant, v, path) if m.name != t.tag]


def _check_object(t: Any, v: dict[str, Any], path: str) -> None:
    members = _struct_members(t, v, path)
    for m in members:
        if m.name in v:
            _check(m.type, v[m.name], _full(path, m.name), m.name)
        elif not m.optional:
            raise QAPIError(f"Parameter '{_full(path, m.name)}' is missing")
    known = {m.name for m in members}
    for k in v:
        if k not in known:
            raise QAPIError(f"Parameter '{_full(path, k)}' is unexpected")


# -- introspection: query-qmp-schema ------------------------------------------------

def introspect() -> list[dict[str, Any]]:
    """``query-qmp-schema``: commands, events, then every type they use.

    Type names are masked as numbers in order of first use, as QEMU masks
    them; builtins keep their names and integer kinds all read ``int``.
    """
    names: dict[str, str] = {}
    order: list[str] = []

    def ref(typ: str) -> str:
        if typ.startswith("["):
            return f"[{ref(typ[1:-1])}]" if typ not in names else names[typ]
        if typ in _INTS:
            typ = "int"
        if typ in _BUILTIN_JSON:
            if typ not in names:
                names[typ] = typ
                order.append(typ)
            return typ
        if typ not in names:
            names[typ] = str(len([n for n in order if n not in _BUILTIN_JSON
                                  and not n.startswith("[")]))
            order.append(typ)
        return names[typ]

    out: list[dict[str, Any]] = []
    for c in COMMANDS.values():
        e: dict[str, Any] = {"name": c.name, "meta-type": "command", "arg-type": ref(c.arg),
                             "ret-type": ref(c.ret)}
        if c.features:
            e["features"] = list(c.features)
        out.append(e)
    for ev in EVENTS.values():
        out.append({"name": ev.name, "meta-type": "event", "arg-type": ref(ev.arg)})
    done: set[str] = set()
    i = 0
    while i < len(order):  # describing a type may reference new ones
        typ = order[i]
        i += 1
        if typ in done:
            continue
        done.add(typ)
        out.append(_describe(typ, ref))
    # Arrays are described where they are referenced.
    arrays: dict[str, str] = {}
    for e in out:
        for t in _refs(e):
            if t.startswith("["):
                arrays[t] = t[1:-1]
    out += [{"name": a, "meta-type": "array", "element-type": el} for a, el in arrays.items()]
    return out


def _refs(e: dict[str, Any]) -> list[str]:
    got = [e[k] for k in ("arg-type", "ret-type", "element-type") if k in e]
    got += [m["type"] for m in e.get("members", []) if "type" in m]
    got += [v["type"] for v in e.get("variants", [])]
    return got


def _describe(typ: str, ref: Callable[[str], str]) -> dict[str, Any]:
    if typ in _BUILTIN_JSON:
        return {"name": typ, "meta-type": "builtin", "json-type": _BUILTIN_JSON[typ]}
    t = TYPES[typ]
    name = ref(typ)
    if isinstance(t, Enum):
        members = []
        for v in t.values:
            m: dict[str, Any] = {"name": v}
            if v in t.features:
                m["features"] = list(t.features[v])
            members.append(m)
        return {"name": name, "meta-type": "enum", "members": members, "values": list(t.values)}
    if isinstance(t, Alternate):
        return {"name": name, "meta-type": "alternate",
                "members": [{"type": ref(x)} for x in t.types]}
    members = []
    for mem in t.members:
        d: dict[str, Any] = {"name": mem.name, "type": ref(mem.type)}
        if mem.optional:
            d["default"] = None
        if mem.features:
            d["features"] = list(mem.features)
        members.append(d)
    e: dict[str, Any] = {"name": name, "meta-type": "object", "members": members}
    if t.tag is not None:
        e["tag"] = t.tag
        e["variants"] = [{"case": c, "type": ref(vt)} for c, vt in t.variants.items()]
    return e
