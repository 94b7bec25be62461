"""``state`` subcommand: every device section decoded through the vmdesc."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import UsageError
from .main import _size, add_snapshot_option

# The readable tree shows this much of a buffer; --json has all of it.
_SHOW_BYTES = 32
_INLINE_ITEMS = 16

EPILOG = """\
examples:
  fixedram state guest.mig                      every device section as a tree
  fixedram state guest.mig --device cpu         the vCPUs' registers only
  fixedram state guest.sav --json | jq '.devices[] | .name'
"""


def cmd_state(a: argparse.Namespace) -> int:
    from ..describe import SCHEMA_VERSION
    from ..format.devstate import decode_configuration, jsonable
    from .progress import open_input

    with open_input(a.file, offset=a.offset, strict=True, snapshot=a.snapshot) as s:
        config = decode_configuration(s.walk())
        devices = s.devices()
        if s.random_access:
            facts = f"{s.format} format, stream at offset {s.start}, machine {s.machine}"
        else:
            facts = (f"{s.format} format, read in one pass"
                     f"{f' ({s.compression}-compressed)' if s.compression else ''}, machine "
                     f"{s.machine}")
    if a.device is not None:
        names = list(dict.fromkeys(d.name for d in devices))
        devices = [d for d in devices if d.name == a.device]
        if not devices:
            raise UsageError(f"{a.file}: no device section named {a.device!r} "
                                f"(sections: {', '.join(names) or 'none'})")
    if a.json:
        doc = {"schema_version": SCHEMA_VERSION, "configuration": jsonable(config),
               "devices": [{"section_id": d.section_id, "name": d.name,
                            "instance_id": d.instance_id, "version_id": d.version_id,
                            "fields": jsonable(d.fields)} for d in devices]}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return 0
    from rich.console import Console
    from rich.text import Text as RichText
    from rich.tree import Tree

    from .render import printable

    def Text(s: str, **kw: Any) -> Any:  # stands in for rich's Text
        # Names and strings come from the file: escapes must not reach the terminal.
        return RichText(printable(s), **kw)

    root = Tree(Text(f"{a.file}: {facts}", style="bold"))
    _add_items(root.add(Text("configuration", style="bold")), config, Text)
    for d in devices:
        node = root.add(Text(f"{d.name} (instance {d.instance_id}, version {d.version_id}, "
                             f"section {d.section_id}) at 0x{d.offset:x}", style="bold"))
        _add_items(node, d.fields, Text)
    Console().print(root)
    return 0


def _scalar(v: Any) -> str | None:
    """A value's one-line text, or None when it needs its own subtree."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"-0x{-v:x}" if v < 0 else f"0x{v:x}"
    if v is None:
        return "nullptr"
    if isinstance(v, bytes):
        shown = v[:_SHOW_BYTES].hex(" ")
        return f"{shown} … ({len(v)} bytes)" if len(v) > _SHOW_BYTES else shown or "(empty)"
    if isinstance(v, (str, float)):
        return str(v)
    if isinstance(v, list) and len(v) <= _INLINE_ITEMS and all(map(_short, v)):
        return "[" + ", ".join(str(_scalar(x)) for x in v) + "]"
    if isinstance(v, dict) and len(v) <= 4 and all(map(_short, v.values())):
        return "{" + ", ".join(f"{k}={_scalar(x)}" for k, x in v.items()) + "}"
    return None


def _short(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str))


def _add_items(node: Any, fields: dict[str, Any], text: Any) -> None:
    """Fields under ``node``; ``text`` is rich's Text (names like env.cr[0] are not markup)."""
    for k, v in fields.items():
        _add_value(node, k, v, text)


def _add_value(node: Any, label: str, v: Any, text: Any) -> None:
    s = _scalar(v)
    if s is not None:
        node.add(text(f"{label}: {s}"))
    elif isinstance(v, dict):
        _add_items(node.add(text(label)), v, text)
    else:  # a long list, or one holding structs or buffers
        sub = node.add(text(f"{label} ({len(v)} elements)"))
        for i, x in enumerate(v):
            _add_value(sub, f"[{i}]", x, text)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("state", help="decode the device state (CPU registers, devices) "
                       "through the vmdesc", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("file", help="the file (a libvirt image in any format), or - for stdin")
    s.add_argument("--json", action="store_true", help="print one JSON object "
                   "(buffers as hex strings)")
    s.add_argument("--device", metavar="NAME", help="only the sections with this name (idstr)")
    s.add_argument("--offset", type=_size, default=None,
                   help="stream start in the file (default: found automatically)")
    add_snapshot_option(s)
    s.set_defaults(func=cmd_state)

