"""Migration capabilities and parameters, with QEMU's names, defaults and checks.

QEMU users script against exact names (``mapped-ram``, ``multifd-channels``)
and search for exact error strings, so both are kept verbatim. The checks run
at the same three moments QEMU runs them: when capabilities are set, when
parameters are set, and when ``migrate`` / ``migrate-incoming`` meets a
transport (only then is it known whether the channel is seekable).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CapabilityError

__all__ = [
    "CAPABILITIES",
    "PARAMETER_DEFAULTS",
    "MigrationConfig",
    "canonical_capability",
    "capability_mismatch",
]

# Capabilities fixedram knows, in QEMU's enum order. "fixed-ram" is the name
# of the seed design and is accepted as an alias of "mapped-ram".
CAPABILITIES = ("xbzrle", "events", "postcopy-ram", "multifd", "mapped-ram")
_ALIASES = {"fixed-ram": "mapped-ram"}

# QEMU 10 defaults: 128 MiB/s bandwidth (MAX_THROTTLE), 300 ms downtime.
PARAMETER_DEFAULTS: dict[str, Any] = {
    "multifd-channels": 2,
    "multifd-compression": "none",
    "direct-io": False,
    "max-bandwidth": 128 << 20,
    "downtime-limit": 300,
    "zero-page-detection": "multifd",
    # fixedram extension (x- like QEMU's experimental knobs): switch over
    # after this many passes even if not converged; 0 = never force.
    "x-max-passes": 0,
}
_COMPRESSIONS = ("none", "zlib", "zstd", "qpl", "uadk", "qatzip")
_ZERO_DETECTION = ("none", "legacy", "multifd")
MAX_DOWNTIME_MS = 2000000


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
    params: dict[str, Any] = field(default_factory=lambda: dict(PARAMETER_DEFAULTS))

    def copy(self) -> MigrationConfig:
        return copy.deepcopy(self)

    def cap(self, name: str) -> bool:
        return self.caps[canonical_capability(name)]

    # -- setting -------------------------------------------------------------

    def set_capabilities(self, states: Mapping[str, bool] | Iterable[Mapping[str, Any]], *,
                         migration_running: bool = False, incoming_started: bool = False) -> None:
        """Apply capability changes atomically after checking the result.

        :param states: ``{"mapped-ram": True}`` or QMP's
            ``[{"capability": "mapped-ram", "state": true}]``.
        :raise CapabilityError: QEMU's message; nothing is applied.
        """
        if migration_running:
            raise CapabilityError("There's a migration process in progress")
        items = (states.items() if isinstance(states, Mapping)
                 else ((s["capability"], s["state"]) for s in states))
        new = dict(self.caps)
        for name, on in items:
            new[canonical_capability(str(name))] = bool(on)
        if incoming_started and new["multifd"] != self.caps["multifd"]:
            raise CapabilityError("Multifd must be set before incoming starts")
        check_capabilities(new)
        self.caps = new

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        """Apply parameter changes after checking them.

        Unlike QEMU (which checks the combination with the values it already
        had, so a bad compression is only refused one call later), the new
        combination is checked at once.
        """
        new = dict(self.params)
        for k, v in values.items():
            if k not in PARAMETER_DEFAULTS:
                raise CapabilityError(f"Parameter '{k}' is unexpected")
            new[k] = _coerce(k, v)
        check_parameters(new, self.caps)
        self.params = new

    # -- queries --------------------------------------------------------------

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": c, "state": self.caps[c]} for c in CAPABILITIES]

    def query_parameters(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def direct_io(self) -> bool:
        """direct-io takes effect only with mapped-ram and multifd (as in QEMU)."""
        return bool(self.params["direct-io"] and self.caps["mapped-ram"] and self.caps["multifd"])

    @property
    def channels(self) -> int:
        """Parallel page writers/readers: multifd-channels with multifd, else 1."""
        return int(self.params["multifd-channels"]) if self.caps["multifd"] else 1

    def check_transport(self, kind: str, seekable: bool) -> None:
        """Checks QEMU makes when ``migrate``/``migrate-incoming`` gets a URI."""
        c = self.caps
        if c["mapped-ram"] and not seekable:
            raise CapabilityError("Migration requires seekable transport (e.g. file)")
        if c["multifd"] and not c["mapped-ram"] and kind in ("file", "exec", "fd"):
            raise CapabilityError("Migration requires multi-channel URIs (e.g. tcp)")
        if self.direct_io and kind != "file":
            raise CapabilityError(
                "Migration requires a transport that allows for extra fds (e.g. file)")
        if c["mapped-ram"] and self.params["multifd-compression"] != "none":
            raise CapabilityError("Cannot use compression with mapped-ram")
        if c["multifd"] and not c["mapped-ram"]:
            # Socket multifd (packets on extra connections) is not built.
            raise CapabilityError("fixedram: multifd without mapped-ram (socket multifd) is not "
                                  "supported; use mapped-ram with a file: URI")
        if self.params["multifd-compression"] != "none":
            raise CapabilityError(f"fixedram: multifd-compression "
                                  f"{self.params['multifd-compression']} is not supported")


def check_capabilities(c: Mapping[str, bool]) -> None:
    """The capability combinations QEMU refuses, in QEMU's order and words."""
    if c["postcopy-ram"] and c["multifd"]:
        raise CapabilityError("Postcopy is not yet compatible with multifd")
    if c["multifd"] and c["xbzrle"]:
        raise CapabilityError("Multifd is not compatible with xbzrle")
    if c["mapped-ram"]:
        if c["xbzrle"]:
            raise CapabilityError("Mapped-ram migration is incompatible with xbzrle")
        if c["postcopy-ram"]:
            raise CapabilityError("Mapped-ram migration is incompatible with postcopy")


def check_parameters(p: Mapping[str, Any], caps: Mapping[str, bool]) -> None:
    if not 1 <= p["multifd-channels"] <= 255:
        raise CapabilityError("Parameter 'multifd_channels' expects a value between 1 and 255")
    if p["downtime-limit"] > MAX_DOWNTIME_MS:
        raise CapabilityError("Parameter 'downtime_limit' expects an integer in the range of 0 "
                              f"to {MAX_DOWNTIME_MS} milliseconds")
    if caps["mapped-ram"] and p["multifd-compression"] != "none":
        raise CapabilityError(
            "Mapped-ram only available for non-compressed non-TLS multifd migration")


def _coerce(k: str, v: Any) -> Any:
    d = PARAMETER_DEFAULTS[k]
    if isinstance(d, bool):
        if not isinstance(v, bool):
            raise CapabilityError(f"Invalid parameter type for '{k}', expected: boolean")
        return v
    if isinstance(d, int):
        if isinstance(v, bool) or not isinstance(v, int):
            raise CapabilityError(f"Invalid parameter type for '{k}', expected: integer")
        if v < 0:
            raise CapabilityError(f"Parameter '{k}' expects uint64")
        return v
    allowed = _COMPRESSIONS if k == "multifd-compression" else _ZERO_DETECTION
    if v not in allowed:
        raise CapabilityError(f"Parameter '{k}' does not accept value '{v}'")
    return v


def capability_mismatch(ours: Mapping[str, bool], received: Iterable[str]) -> None:
    """The destination's check of the capabilities recorded in a stream.

    QEMU validates ``x-ignore-shared`` and ``mapped-ram``; fixedram has no
    x-ignore-shared, so a stream that carries it is refused as "on vs off".
    """
    rec = set(received)
    for cap in ("x-ignore-shared", "mapped-ram"):
        mine = bool(ours.get(cap, False))
        theirs = cap in rec
        if mine != theirs:
            raise CapabilityError(f"Capability {cap} is {'on' if mine else 'off'}, but received "
                                  f"capability is {'on' if theirs else 'off'}")
