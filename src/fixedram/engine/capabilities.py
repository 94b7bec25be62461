"""Migration capabilities and parameters of QEMU 10.0, with QEMU's rules.

Every name QEMU 10.0's ``query-migrate-capabilities`` (22) and
``query-migrate-parameters`` (28) report exists here with QEMU's default.
QEMU users script against exact names and search for exact error strings,
so both are kept verbatim, and each rule runs at the step where QEMU runs it:

* ``migrate-set-capabilities``: :func:`check_capabilities` (QEMU's
  ``migrate_caps_check``), on the whole new set.
* ``migrate-set-parameters``: :func:`check_parameters` (QEMU's
  ``migrate_params_check``) on the current values merged with the new ones,
  except the mapped-ram rule, which QEMU checks against the values already
  set (so ``multifd-compression zstd`` is accepted once with mapped-ram on,
  and every later ``migrate-set-parameters`` is refused until mapped-ram is
  turned off: QEMU 10.0.2 behaves exactly so).
* ``migrate``: :meth:`MigrationConfig.check_transport` and
  :meth:`MigrationConfig.check_migrate` (QEMU's ``migration_transport_compatible``
  and ``migrate_prepare``: "Cannot use compression with mapped-ram"), then
  :meth:`MigrationConfig.unsupported`: what the built-in guest cannot honour,
  refused with a message that names it (docs/qmp.md lists them).

Types (``uint8_t`` ranges, booleans, enums) are checked before any of this by
the QAPI schema (:mod:`fixedram.engine.qapi`), as QEMU's visitors do.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CapabilityError
from ..format.constants import TARGET_PAGE_SIZE

__all__ = [
    "CAPABILITIES",
    "PARAMETERS",
    "PARAMETER_DEFAULTS",
    "MigrationConfig",
    "canonical_capability",
    "capability_mismatch",
]

# QEMU 10.0's MigrationCapability enum, in its order (the order of
# query-migrate-capabilities).
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
    "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
    "switchover-ack", "dirty-limit", "mapped-ram",
)
# Only for the Python API and the command line: QMP takes QEMU's names only.
_ALIASES = {"fixed-ram": "mapped-ram"}
DEPRECATED_CAPABILITIES = ("zero-blocks",)

MAX_THROTTLE = 128 << 20  # QEMU's default max-bandwidth
MAX_DOWNTIME_MS = 2000 * 1000

# QEMU 10.0's MigrationParameters, in schema order, with QEMU's defaults.
# block-bitmap-mapping has no default: it is reported once it has been set.
PARAMETERS: dict[str, Any] = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
    "max-bandwidth": MAX_THROTTLE,
    "avail-switchover-bandwidth": 0,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "multifd-channels": 2,
    "xbzrle-cache-size": 64 << 20,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-qatzip-level": 1,
    "multifd-zstd-level": 1,
    "block-bitmap-mapping": None,
    "x-vcpu-dirty-limit-period": 1000,
    "vcpu-dirty-limit": 1,
    "mode": "normal",
    "zero-page-detection": "multifd",
    "direct-io": False,
}
PARAMETER_DEFAULTS = PARAMETERS  # the name older callers use
# Compression methods this QEMU build has (qpl, uadk and qatzip are
# build options Debian's QEMU 10.0 lacks: its schema does not list them).
MULTIFD_COMPRESSIONS = ("none", "zlib", "zstd")
ZERO_PAGE_DETECTIONS = ("none", "legacy", "multifd")
MIG_MODES = ("normal", "cpr-reboot", "cpr-transfer")

# fixedram's own knob (not on QMP): switch over after this many passes even
# if not converged; 0 = never force.
INTERNAL_PARAMETERS = ("x-max-passes",)

# Capabilities the built-in guest has nothing for, so turning them on changes
# nothing, as in a QEMU whose VM has no such thing (no disks, no RDMA, no
# postcopy): accepted and reported, without effect.
NO_EFFECT = ("rdma-pin-all", "zero-blocks", "release-ram", "postcopy-blocktime",
             "late-block-activate")
# What the built-in guest cannot do; refused at migrate (docs/qmp.md).
_UNSUPPORTED = {
    "xbzrle": "XBZRLE page compression",
    "postcopy-ram": "postcopy",
    "postcopy-preempt": "postcopy",
    "x-colo": "COLO",
    "dirty-bitmaps": "block dirty bitmap migration (it runs in postcopy)",
    "x-ignore-shared": "x-ignore-shared (no shared RAM to skip)",
    "validate-uuid": "VM UUID validation (the built-in guest has no UUID)",
    "background-snapshot": "background snapshots",
    "zero-copy-send": "zero-copy send (socket multifd only)",
    "switchover-ack": "switchover acknowledgement",
}


def canonical_capability(name: str) -> str:
    """QEMU's name for a capability; raises for names QEMU would not parse."""
    n = _ALIASES.get(name, name)
    if n not in CAPABILITIES:
        raise CapabilityError(f"Parameter 'capability' does not accept value '{name}'")
    return n


@dataclass
class MigrationConfig:
    """Capability and parameter state of one migration endpoint.

    :param caps: capability -> on/off.
    :param params: parameter -> value (QEMU's dashed names).
    """

    caps: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(CAPABILITIES, False))
    params: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(PARAMETERS))
    max_passes: int = 0

    def copy(self) -> MigrationConfig:
        return copy.deepcopy(self)

    def cap(self, name: str) -> bool:
        return self.caps[canonical_capability(name)]

    # -- setting -------------------------------------------------------------

    def set_capabilities(self, states: Mapping[str, bool] | Iterable[Mapping[str, Any]], *,
                         migration_running: bool = False, incoming_started: bool = False,
                         inmigrate: bool = False, host_check: bool = True) -> None:
        """Apply capability changes atomically after checking the result.

        :param states: ``{"mapped-ram": True}`` or QMP's
            ``[{"capability": "mapped-ram", "state": true}]``.
        :param incoming_started: ``migrate-incoming`` has been issued.
        :param inmigrate: the run state is ``inmigrate``: a destination, where
            postcopy is checked against the host and mapped-ram may go with it
            (fast snapshot load).
        :param host_check: ask the kernel for a userfaultfd (QMP, as QEMU
            does); ``restore --postcopy`` maps the file and needs none.
        :raise CapabilityError: QEMU's message; nothing is applied.
        """
        if migration_running:
            raise CapabilityError("There's a migration process in progress")
        items = (states.items() if isinstance(states, Mapping)
                 else ((s["capability"], s["state"]) for s in states))
        new = dict(self.caps)
        for name, on in items:
            new[canonical_capability(str(name))] = bool(on)
        check_capabilities(self.caps, new, self.params, incoming_started=incoming_started,
                           inmigrate=inmigrate, host_check=host_check)
        self.caps = new

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        """Apply ``migrate-set-parameters`` (types already checked by the schema).

        ``None`` for a ``tls-*`` parameter means "" (QEMU's StrOrNull). The
        merged set is checked as QEMU checks it; nothing is applied on error.
        """
        from .qapi import QAPIError, check_arguments

        qmp = {k: v for k, v in values.items() if k not in INTERNAL_PARAMETERS}
        try:  # the types, as the QMP command checks them (no-op after QMP did)
            check_arguments("migrate-set-parameters", qmp)
        except QAPIError as e:
            raise CapabilityError(e.desc) from None
        new = dict(self.params)
        for k, v in values.items():
            if k in INTERNAL_PARAMETERS:
                self.max_passes = _internal_int(k, v)
                continue
            if k.startswith("tls-") and v is None:
                v = ""
            new[k] = _unsigned(v) if isinstance(v, int) and not isinstance(v, bool) else v
        check_parameters(new, self.caps, self.params)
        self.params = new

    # -- queries --------------------------------------------------------------

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": c, "state": self.caps[c]} for c in CAPABILITIES]

    def query_parameters(self) -> dict[str, Any]:
        out = copy.deepcopy(self.params)
        if out["block-bitmap-mapping"] is None:
            del out["block-bitmap-mapping"]
        return out

    @property
    def direct_io(self) -> bool:
        """direct-io takes effect only with mapped-ram and multifd (as in QEMU)."""
        return bool(self.params["direct-io"] and self.caps["mapped-ram"] and self.caps["multifd"])

    @property
    def channels(self) -> int:
        """Parallel page writers/readers: multifd-channels with multifd, else 1."""
        return int(self.params["multifd-channels"]) if self.caps["multifd"] else 1

    @property
    def tls(self) -> bool:
        return bool(self.params["tls-creds"])

    # -- migrate ------------------------------------------------------------------

    def check_transport(self, kind: str, seekable: bool) -> None:
        """QEMU's ``migration_transport_compatible``: the URI against the capabilities.

        ``kind`` is the URI scheme (file, tcp, unix, exec, fd); ``seekable``
        whether pages can be written at fixed offsets (``file:`` only).
        """
        c = self.caps
        if c["mapped-ram"] and not seekable:
            raise CapabilityError("Migration requires seekable transport (e.g. file)")
        multi_channel = kind in ("tcp", "unix") or (kind == "file" and c["mapped-ram"])
        if c["multifd"] and not multi_channel:
            raise CapabilityError("Migration requires multi-channel URIs (e.g. tcp)")
        if self.direct_io and kind != "file":
            raise CapabilityError(
                "Migration requires a transport that allows for extra fds (e.g. file)")
        if self.params["mode"] == "cpr-transfer" and kind == "file":
            raise CapabilityError("Migration requires streamable transport (eg unix)")

    def check_migrate(self) -> None:
        """The capability/parameter checks of QEMU's ``migrate_prepare``."""
        if self.caps["mapped-ram"]:
            if self.caps["postcopy-ram"]:  # set on a destination, then migrate asked
                raise CapabilityError("Mapped-ram migration is incompatible with postcopy")
            if self.tls:
                raise CapabilityError("Cannot use TLS with mapped-ram")
            if self.params["multifd-compression"] != "none":
                raise CapabilityError("Cannot use compression with mapped-ram")
        if self.params["mode"] != "normal":
            c = self.caps
            conflict = ("postcopy" if c["postcopy-ram"] or c["dirty-bitmaps"]
                        else "background snapshot" if c["background-snapshot"]
                        else "COLO" if c["x-colo"] else None)
            if conflict:
                raise CapabilityError(f"Cannot use {conflict} with CPR")

    def unsupported(self, kind: str, incoming: bool = False) -> str | None:
        """Why the built-in guest cannot run this migration, or None.

        QEMU would accept these settings; the engine cannot honour them, so
        ``migrate`` (and ``migrate-incoming``) refuses them with this text
        rather than silently doing something else.
        """
        for cap, what in _UNSUPPORTED.items():
            if self.caps[cap]:
                return f"fixedram: capability {cap} is not supported: {what}"
        if self.caps["return-path"] and kind not in ("tcp", "unix"):
            return (f"fixedram: capability return-path needs a two-way transport (tcp: or "
                    f"unix:); {kind}: has none")
        if self.caps["pause-before-switchover"] and incoming:
            return None  # a source-side capability: nothing to do here
        if self.caps["multifd"] and not self.caps["mapped-ram"]:
            return ("fixedram: multifd without mapped-ram (socket multifd) is not supported; "
                    "use mapped-ram with a file: URI")
        p = self.params
        if p["multifd-compression"] != "none":
            return f"fixedram: multifd-compression {p['multifd-compression']} is not supported"
        if p["tls-creds"]:
            return "fixedram: TLS migration (tls-creds) is not supported"
        if p["mode"] != "normal":
            return f"fixedram: migration mode {p['mode']} is not supported"
        return None


    def unsupported_incoming(self, kind: str) -> str | None:
        """:meth:`unsupported` for a destination: only what changes how the
        stream arrives matters there (the stream itself says the rest)."""
        if self.caps["multifd"] and not self.caps["mapped-ram"]:
            return ("fixedram: multifd without mapped-ram (socket multifd) is not supported; "
                    "use mapped-ram with a file: URI")
        if self.params["tls-creds"]:
            return "fixedram: TLS migration (tls-creds) is not supported"
        return None


def check_capabilities(old: Mapping[str, bool], c: Mapping[str, bool],
                       params: Mapping[str, Any], *, incoming_started: bool = False,
                       inmigrate: bool = False, host_check: bool = True) -> None:
    """The capability combinations QEMU 10.0 refuses, in its order and words.

    One rule follows QEMU master instead: mapped-ram with postcopy-ram is
    accepted on a destination (``inmigrate``), the fast snapshot load of
    docs/devel/migration/fast-snapshot-load.rst; a source still refuses it.
    """
    if c["postcopy-ram"]:
        if not old["postcopy-ram"] and inmigrate and host_check:
            why = userfaultfd_problem()
            if why:
                raise CapabilityError(f"Postcopy is not supported: {why}")
        if c["x-ignore-shared"]:
            raise CapabilityError("Postcopy is not compatible with ignore-shared")
        if c["multifd"]:
            raise CapabilityError("Postcopy is not yet compatible with multifd")
    if c["background-snapshot"]:
        if userfaultfd_problem(write_protect=True):
            raise CapabilityError("Background-snapshot is not supported by host kernel")
        for other in _BACKGROUND_SNAPSHOT_CONFLICTS:
            if c[other]:
                raise CapabilityError(f"Background-snapshot is not compatible with {other}")
    if c["zero-copy-send"] and (not c["multifd"] or c["xbzrle"]
                                or params["multifd-compression"] != "none"
                                or params["tls-creds"]):
        raise CapabilityError(
            "Zero copy only available for non-compressed non-TLS multifd migration")
    if c["postcopy-preempt"]:
        if not c["postcopy-ram"]:
            raise CapabilityError("Postcopy preempt requires postcopy-ram")
        if incoming_started:
            raise CapabilityError("Postcopy preempt must be set before incoming starts")
    if c["multifd"] and incoming_started:
        raise CapabilityError("Multifd must be set before incoming starts")
    if c["switchover-ack"] and not c["return-path"]:
        raise CapabilityError("Capability 'switchover-ack' requires capability 'return-path'")
    if c["dirty-limit"]:
        if c["auto-converge"]:
            raise CapabilityError("dirty-limit conflicts with auto-converge either of then "
                                  "available currently")
        # It needs KVM's dirty ring; the built-in guest, like TCG, has none.
        raise CapabilityError("dirty-limit requires KVM with accelerator property "
                              "'dirty-ring-size' set")
    if c["multifd"] and c["xbzrle"]:
        raise CapabilityError("Multifd is not compatible with xbzrle")
    if c["mapped-ram"]:
        if c["xbzrle"]:
            raise CapabilityError("Mapped-ram migration is incompatible with xbzrle")
        if c["postcopy-ram"] and not inmigrate:
            raise CapabilityError("Mapped-ram migration is incompatible with postcopy")


_BACKGROUND_SNAPSHOT_CONFLICTS = (
    "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
    "return-path", "multifd", "pause-before-switchover", "auto-converge", "release-ram",
    "rdma-pin-all", "xbzrle", "x-colo", "validate-uuid", "zero-copy-send",
)


def _range(name: str, what: str) -> CapabilityError:
    return CapabilityError(f"Parameter '{name}' expects {what}")


def check_parameters(p: Mapping[str, Any], caps: Mapping[str, bool],
                     current: Mapping[str, Any] | None = None) -> None:
    """QEMU 10.0's parameter checks, in its order and words.

    :param p: the current parameters merged with the new ones.
    :param current: the parameters before the change (QEMU checks the
        mapped-ram rule against these); ``p`` when omitted.
    """
    cur = p if current is None else current
    if not 1 <= p["throttle-trigger-threshold"] <= 100:
        raise _range("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= p["cpu-throttle-initial"] <= 99:
        raise _range("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= p["cpu-throttle-increment"] <= 99:
        raise _range("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if p["downtime-limit"] > MAX_DOWNTIME_MS:
        raise _range("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    if p["multifd-channels"] < 1:
        raise _range("multifd_channels", "a value between 1 and 255")
    if p["multifd-zlib-level"] > 9:
        raise _range("multifd_zlib_level", "a value between 0 and 9")
    if not 1 <= p["multifd-qatzip-level"] <= 9:
        raise _range("multifd_qatzip_level", "a value between 1 and 9")
    if p["multifd-zstd-level"] > 20:
        raise _range("multifd_zstd_level", "a value between 0 and 20")
    xb = p["xbzrle-cache-size"]
    if xb < TARGET_PAGE_SIZE or xb & (xb - 1):
        raise _range("xbzrle_cache_size", "a power of two no less than the target page size")
    if not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99:
        raise _range("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if p["announce-initial"] > 100000:
        raise _range("announce_initial", "a value between 0 and 100000")
    if p["announce-max"] > 100000:
        raise _range("announce_max", "a value between 0 and 100000")
    if p["announce-rounds"] > 1000:
        raise _range("announce_rounds", "a value between 0 and 1000")
    if not 1 <= p["announce-step"] <= 10000:
        raise _range("announce_step", "a value between 0 and 10000")
    if p["block-bitmap-mapping"] is not None:
        why = _bitmap_mapping_problem(p["block-bitmap-mapping"])
        if why:
            raise CapabilityError(f"Invalid mapping given for block-bitmap-mapping: {why}")
    if caps["zero-copy-send"] and (p["multifd-compression"] != "none" or p["tls-creds"]):
        raise CapabilityError(
            "Zero copy only available for non-compressed non-TLS multifd migration")
    if caps["mapped-ram"] and (cur["multifd-compression"] != "none" or cur["tls-creds"]):
        raise CapabilityError(
            "Mapped-ram only available for non-compressed non-TLS multifd migration")
    if not 1 <= p["x-vcpu-dirty-limit-period"] <= 1000:
        raise _range("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if p["vcpu-dirty-limit"] < 1:
        raise CapabilityError("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s")


# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_WELLFORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def _bitmap_mapping_problem(mapping: list[dict[str, Any]]) -> str | None:
    """QEMU's check of a block-bitmap-mapping (both directions must be unique)."""
    names: set[str] = set()
    aliases: set[str] = set()
    for node in mapping:
        alias = node["alias"]
        if not _WELLFORMED.fullmatch(alias):
            return f"The node alias '{alias}' is not well-formed"
        if len(alias.encode()) > 255:
            return f"The node alias '{alias}' is longer than 255 bytes"
        if node["node-name"] in names:
            return f"The node name '{node['node-name']}' is mapped twice"
        if alias in aliases:
            return f"The node alias '{alias}' is used twice"
        names.add(node["node-name"])
        aliases.add(alias)
        bnames: set[str] = set()
        baliases: set[str] = set()
        for bm in node["bitmaps"]:
            if len(bm["alias"].encode()) > 255:
                return f"The bitmap alias '{bm['alias']}' is longer than 255 bytes"
            if bm["name"] in bnames:
                return f"The bitmap '{node['node-name']}'/'{bm['name']}' is mapped twice"
            if bm["alias"] in baliases:
                return f"The bitmap alias '{alias}'/'{bm['alias']}' is used twice"
            bnames.add(bm["name"])
            baliases.add(bm["alias"])
    return None


def _unsigned(v: int) -> int:
    """QEMU stores a negative JSON integer given for an unsigned parameter as
    its two's complement (``-1`` -> 2**64 - 1), for backward compatibility."""
    return v & ((1 << 64) - 1) if v < 0 else v


def _internal_int(k: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CapabilityError(f"Parameter '{k}' expects a non-negative integer")
    return v


# -- the host's userfaultfd (postcopy and background-snapshot need it) -------------

_UFFDIO_API = 0xC018AA3F
_UFFD_API = 0xAA
_UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


def userfaultfd_problem(write_protect: bool = False) -> str | None:
    """Why this host cannot give a userfaultfd (None when it can).

    QEMU asks the kernel the same question before it accepts postcopy on a
    destination or background-snapshot anywhere, so both answer alike on
    one host.
    """
    nr = _NR_USERFAULTFD.get(os.uname().machine)
    if nr is None:
        return "Userfaultfd not available: Function not implemented"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        e = ctypes.get_errno()
        return f"Userfaultfd not available: {os.strerror(e or errno.ENOSYS)}"
    try:
        api = (ctypes.c_uint64 * 3)(_UFFD_API, 0, 0)
        if libc.ioctl(fd, ctypes.c_ulong(_UFFDIO_API), api) != 0:
            return f"UFFDIO_API failed: {os.strerror(ctypes.get_errno())}"
        if write_protect and not api[1] & _UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            return "write protection not supported"
    finally:
        os.close(fd)
    return None


def capability_mismatch(ours: Mapping[str, bool], received: Iterable[str]) -> None:
    """The destination's check of the capabilities recorded in a stream.

    QEMU validates ``x-ignore-shared`` and ``mapped-ram``, in that order.
    """
    rec = set(received)
    for cap in ("x-ignore-shared", "mapped-ram"):
        mine = bool(ours.get(cap, False))
        theirs = cap in rec
        if mine != theirs:
            raise CapabilityError(f"Capability {cap} is {'on' if mine else 'off'}, but received "
                                  f"capability is {'on' if theirs else 'off'}")
