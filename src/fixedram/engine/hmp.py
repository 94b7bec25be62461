"""``human-monitor-command``: the HMP commands of migration, as QEMU 10.0 prints them.

``info status``, ``info migrate``, ``info ramblock``, ``info migrate_capabilities``,
``info migrate_parameters``, ``info version``, and the commands scripts send
through HMP (``stop``, ``cont``, ``migrate [-d] URI``, ``migrate_cancel``,
``migrate_incoming URI``, ``migrate_set_capability NAME on|off``,
``migrate_set_parameter NAME VALUE``, ``migrate_continue STATE``, ``quit``).
Output lines end in CR LF, as QEMU's monitor sends them over QMP; errors
read ``Error: ...`` as QEMU's ``hmp_handle_error`` prints them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import FixedramError
from ..sizes import SizeError, parse_size
from .capabilities import CAPABILITIES, MIG_MODES, MULTIFD_COMPRESSIONS, ZERO_PAGE_DETECTIONS
from .guest import PAGE
from .qapi import QAPIError

if TYPE_CHECKING:
    from .machine import GuestMachine

__all__ = ["run_hmp"]

_INFO_HELP = {
    "migrate": "show migration status",
    "migrate_capabilities": "show current migration capabilities",
    "migrate_parameters": "show current migration parameters",
    "ramblock": "Display system ramblock information",
    "status": "show the current VM status (running|paused)",
    "version": "show the version of QEMU",
}


class _Usage(FixedramError):
    """A command line HMP could not parse: QEMU prints the reason and a hint."""

    def __init__(self, cmd: str, why: str) -> None:
        super().__init__(why)
        self.text = f"{why}\nTry \"help {cmd}\" for more information\n"


def run_hmp(m: GuestMachine, line: str) -> str:
    words = line.split()
    if not words:
        return ""
    try:
        out = _dispatch(m, words)
    except _Usage as u:
        out = u.text
    except QAPIError as e:
        out = f"Error: {e.desc}\n"
    return out.replace("\n", "\r\n")


def _dispatch(m: GuestMachine, w: list[str]) -> str:
    cmd, args = w[0], w[1:]
    if cmd == "info":
        if not args:
            return "".join(f"info {k}  -- {v}\n" for k, v in _INFO_HELP.items())
        if args[0] not in _INFO:
            return f"unknown command: 'info {args[0]}'\n"
        if len(args) > 1:
            raise _Usage(f"info {args[0]}", f"{args[0]}: extraneous characters at the end "
                         "of line")
        return _INFO[args[0]](m)
    if cmd not in _COMMANDS:
        return f"unknown command: '{cmd}'\n"
    nargs, fn = _COMMANDS[cmd]
    flags = [a for a in args if a.startswith("-") and cmd == "migrate"]
    rest = [a for a in args if a not in flags]
    if len(rest) < nargs:
        if cmd == "migrate_set_capability" and len(rest) == 1:  # a missing boolean
            raise _Usage(cmd, "Expected 'on' or 'off'")
        raise _Usage(cmd, f"{cmd}: string expected")
    if len(rest) > nargs:
        raise _Usage(cmd, f"{cmd}: extraneous characters at the end of line")
    return fn(m, rest, flags)


# -- commands -------------------------------------------------------------------------

def _qmp(m: GuestMachine, cmd: str, **args: Any) -> Any:
    return m.execute(cmd, args)


def _do(cmd: str, arg: str | None = None) -> Callable[[GuestMachine, list[str], list[str]], str]:
    """An HMP command that is one QMP command printing nothing on success."""
    def run(m: GuestMachine, a: list[str], flags: list[str]) -> str:
        _qmp(m, cmd, **({arg: a[0]} if arg else {}))
        return ""
    return run


def _migrate(m: GuestMachine, a: list[str], flags: list[str]) -> str:
    _qmp(m, "migrate", uri=a[0])
    if "-d" in flags:
        return ""
    return "terminal does not allow synchronous migration, continuing detached\n"


def _set_capability(m: GuestMachine, a: list[str], flags: list[str]) -> str:
    name, state = a
    if state not in ("on", "off"):
        raise _Usage("migrate_set_capability", "Expected 'on' or 'off'")
    if name not in CAPABILITIES:
        raise QAPIError(f"invalid parameter value: {name}")
    _qmp(m, "migrate-set-capabilities",
         capabilities=[{"capability": name, "state": state == "on"}])
    return ""


_SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.")
_UINT8 = ("throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment",
          "max-cpu-throttle", "multifd-channels", "multifd-zlib-level", "multifd-qatzip-level",
          "multifd-zstd-level")
_BOOL = ("cpu-throttle-tailslow", "direct-io")
_ENUMS = {"multifd-compression": MULTIFD_COMPRESSIONS,
          "zero-page-detection": ZERO_PAGE_DETECTIONS, "mode": MIG_MODES}


def _hmp_value(name: str, text: str) -> Any:
    """A parameter value as QEMU's HMP reads it (a string input visitor;
    bandwidths default to MiB)."""
    if name.startswith("tls-"):
        return text
    if name in _BOOL:
        if text in ("on", "yes", "true", "y"):
            return True
        if text in ("off", "no", "false", "n"):
            return False
        raise QAPIError(f"Parameter '{name}' expects 'on' or 'off'")
    if name in _ENUMS:
        if text not in _ENUMS[name]:
            raise QAPIError(f"Parameter '{name}' does not accept value '{text}'")
        return text
    if name in ("max-bandwidth", "avail-switchover-bandwidth"):
        try:
            v = parse_size(text) << (20 if re.fullmatch(r"[0-9]+", text) else 0)
        except SizeError:
            v = -1
        if not 0 <= v < (1 << 63):
            raise QAPIError(f"Invalid size {text}")
        return v
    if name in _UINT8 or name == "x-checkpoint-delay":
        if not re.fullmatch(r"[0-9]+", text):
            raise QAPIError(f"Parameter '{name}' expects uint64")
        v = int(text)
        limit, kind = (0xFF, "uint8_t") if name in _UINT8 else (0xFFFFFFFF, "uint32_t")
        if v > limit:
            raise QAPIError(f"Parameter '{name}' expects {kind}")
        return v
    try:  # sizes (downtime-limit, xbzrle-cache-size, announce-*, ...)
        return parse_size(text, limit=(1 << 64) - 1)
    except SizeError:
        raise QAPIError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                        f"{_SIZE_HINT}") from None


def _set_parameter(m: GuestMachine, a: list[str], flags: list[str]) -> str:
    name, text = a
    from .capabilities import PARAMETERS

    if name not in PARAMETERS:
        raise QAPIError(f"invalid parameter value: {name}")
    if name == "block-bitmap-mapping":
        raise QAPIError("The block-bitmap-mapping parameter can only be set through QMP")
    _qmp(m, "migrate-set-parameters", **{name: _hmp_value(name, text)})
    return ""


_COMMANDS: dict[str, tuple[int, Callable[[GuestMachine, list[str], list[str]], str]]] = {
    "stop": (0, _do("stop")),
    "cont": (0, _do("cont")),
    "c": (0, _do("cont")),
    "quit": (0, _do("quit")),
    "q": (0, _do("quit")),
    "migrate": (1, _migrate),
    "migrate_cancel": (0, _do("migrate_cancel")),
    "migrate_incoming": (1, _do("migrate-incoming", "uri")),
    "migrate_continue": (1, _do("migrate-continue", "state")),
    "migrate_set_capability": (2, _set_capability),
    "migrate_set_parameter": (2, _set_parameter),
}


# -- info -----------------------------------------------------------------------------

def _info_status(m: GuestMachine) -> str:
    st = m.g.status
    extra = "" if st in ("running", "paused") else f" ({st})"
    return f"VM status: {'running' if m.g.running else 'paused'}{extra}\n"


def _info_migrate(m: GuestMachine) -> str:
    info = m.cmd_query_migrate({})
    # The built-in guest's stream carries no global-state section.
    out = ["globals:", "store-global-state: off", "only-migratable: off",
           "send-configuration: on", "send-section-footer: on", "send-switchover-start: on",
           "clear-bitmap-shift: 18"]
    if "status" in info:
        line = f"Migration status: {info['status']}"
        if info["status"] == "failed" and info.get("error-desc"):
            line += f" ({info['error-desc']})"
        out.append(line)
        out.append(f"total time: {info.get('total-time', 0)} ms")
        if "expected-downtime" in info:
            out.append(f"expected downtime: {info['expected-downtime']} ms")
        if "downtime" in info:
            out.append(f"downtime: {info['downtime']} ms")
        if "setup-time" in info:
            out.append(f"setup: {info['setup-time']} ms")
    r = info.get("ram")
    if r is not None:
        out += [f"transferred ram: {r['transferred'] >> 10} kbytes",
                f"throughput: {r['mbps']:0.2f} mbps",
                f"remaining ram: {r['remaining'] >> 10} kbytes",
                f"total ram: {r['total'] >> 10} kbytes",
                f"duplicate: {r['duplicate']} pages",
                f"normal: {r['normal']} pages",
                f"normal bytes: {r['normal-bytes'] >> 10} kbytes",
                f"dirty sync count: {r['dirty-sync-count']}",
                f"page size: {r['page-size'] >> 10} kbytes",
                f"multifd bytes: {r['multifd-bytes'] >> 10} kbytes",
                f"pages-per-second: {r['pages-per-second']}"]
        if r["dirty-pages-rate"]:
            out.append(f"dirty pages rate: {r['dirty-pages-rate']} pages")
        if r["precopy-bytes"]:
            out.append(f"precopy ram: {r['precopy-bytes'] >> 10} kbytes")
        if r["downtime-bytes"]:
            out.append(f"downtime ram: {r['downtime-bytes'] >> 10} kbytes")
    if "cpu-throttle-percentage" in info:
        out.append(f"cpu throttle percentage: {info['cpu-throttle-percentage']}")
    if "socket-address" in info:
        out.append("socket address: [")
        for a in info["socket-address"]:
            out.append(f"\ttcp:{a['host']}:{a['port']}" if a["type"] == "inet"
                       else f"\tunix:{a['path']}")
        out.append("]")
    return "".join(line + "\n" for line in out)


def _info_ramblock(m: GuestMachine) -> str:
    out = [f"{'Block Name':>24} {'PSize':>8}  {'Offset':>18} {'Used':>18} {'Total':>18} "
           f"{'HVA':>18} {'RO':>3}"]
    offset = 0
    for b in m.g.blocks:
        hva = b.data.ctypes.data
        ro = "ro" if b.idstr == "pc.bios" else "rw"  # firmware, as in QEMU
        out.append(f"{b.idstr:>24} {f'{PAGE >> 10} KiB':>8}  0x{offset:016x} 0x{b.size:016x} "
                   f"0x{b.size:016x} 0x{hva:016x} {ro:>3}")
        offset += b.size
    return "".join(line + "\n" for line in out)


def _info_capabilities(m: GuestMachine) -> str:
    return "".join(f"{c['capability']}: {'on' if c['state'] else 'off'}\n"
                   for c in m.cfg.query_capabilities())


def _info_parameters(m: GuestMachine) -> str:
    p = m.cfg.params
    onoff = {True: "on", False: "off"}
    lines = [
        f"announce-initial: {p['announce-initial']} ms",
        f"announce-max: {p['announce-max']} ms",
        f"announce-rounds: {p['announce-rounds']}",
        f"announce-step: {p['announce-step']} ms",
        f"throttle-trigger-threshold: {p['throttle-trigger-threshold']}",
        f"cpu-throttle-initial: {p['cpu-throttle-initial']}",
        f"cpu-throttle-increment: {p['cpu-throttle-increment']}",
        f"cpu-throttle-tailslow: {onoff[p['cpu-throttle-tailslow']]}",
        f"max-cpu-throttle: {p['max-cpu-throttle']}",
        f"tls-creds: '{p['tls-creds']}'",
        f"tls-hostname: '{p['tls-hostname']}'",
        f"max-bandwidth: {p['max-bandwidth']} bytes/second",
        f"avail-switchover-bandwidth: {p['avail-switchover-bandwidth']} bytes/second",
        f"downtime-limit: {p['downtime-limit']} ms",
        f"x-checkpoint-delay: {p['x-checkpoint-delay']} ms",
        f"multifd-channels: {p['multifd-channels']}",
        f"multifd-compression: {p['multifd-compression']}",
        f"zero-page-detection: {p['zero-page-detection']}",
        f"xbzrle-cache-size: {p['xbzrle-cache-size']} bytes",
        f"max-postcopy-bandwidth: {p['max-postcopy-bandwidth']}",
        f"tls-authz: '{p['tls-authz']}'",
    ]
    if p["block-bitmap-mapping"] is not None:
        lines.append("block-bitmap-mapping:")
        for node in p["block-bitmap-mapping"]:
            lines.append(f"  '{node['node-name']}' -> '{node['alias']}'")
            lines += [f"    '{b['name']}' -> '{b['alias']}'" for b in node["bitmaps"]]
    lines += [
        f"x-vcpu-dirty-limit-period: {p['x-vcpu-dirty-limit-period']} ms",
        f"vcpu-dirty-limit: {p['vcpu-dirty-limit']} MB/s",
        f"mode: {p['mode']}",
        f"direct-io: {onoff[p['direct-io']]}",
    ]
    return "".join(line + "\n" for line in lines)


def _info_version(m: GuestMachine) -> str:
    v = m.cmd_query_version({})
    q = v["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']}{v['package']}\n"


_INFO: dict[str, Callable[[GuestMachine], str]] = {
    "migrate": _info_migrate,
    "migrate_capabilities": _info_capabilities,
    "migrate_parameters": _info_parameters,
    "ramblock": _info_ramblock,
    "status": _info_status,
    "version": _info_version,
}
