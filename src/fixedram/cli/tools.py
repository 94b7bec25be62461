"""``convert`` and ``verify`` subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import FixedramError
from .main import _EXTRA, _size


def cmd_convert(a: argparse.Namespace) -> int:
    from ..tools.convert import convert_file
    from .progress import progress_bar

    total = 0
    if a.output != "-" and sys.stderr.isatty():  # the size is needed only for a bar
        from ..format.migfile import MigrationFile
        from ..memory.extract import total_bytes

        with MigrationFile(a.input, offset=a.input_offset) as mf:
            total = total_bytes(mf)
    with progress_bar("converting", total) as prog:
        convert_file(a.input, a.output, a.to, offset=a.offset, src_offset=a.input_offset,
                     force=a.force, progress=prog, stdout=sys.stdout.buffer)
    if a.output == "-":
        sys.stdout.buffer.flush()
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from ..tools.verify import compare, open_checked

    mf, probs = open_checked(a.file)
    result: dict[str, object] = {"file": a.file, "problems": probs, "sound": not probs}
    diffs = []
    if a.against:
        other, probs_b = open_checked(a.against)
        result["against"] = a.against
        result["against_problems"] = probs_b
        if mf is None or other is None:
            raise FixedramError("cannot compare: " + "; ".join(probs + probs_b))
        with mf, other:
            diffs = [d.as_dict() for d in compare(mf, other)]
        result["differences"] = diffs
        result["equal"] = not diffs
    elif mf is not None:
        mf.close()
    ok = not probs and not diffs
    if a.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for p in probs:
            print(f"{a.file}: {p}")
        for d in diffs:
            if d["only_in"]:
                where = a.file if d["only_in"] == "a" else a.against
                print(f"block {d['idstr']!r}: only in {where}")
            elif d["used_length_a"] != d["used_length_b"]:
                print(f"block {d['idstr']!r}: length 0x{d['used_length_a']:x} vs "
                      f"0x{d['used_length_b']:x}")
            else:
                pages = d["differing_pages"]
                shown = ", ".join(f"{p} (0x{p * 4096:x})" for p in pages[:20])
                more = f" and {d['differing_count'] - 20} more" if d["differing_count"] > 20 else ""
                print(f"block {d['idstr']!r}: {d['differing_count']} differing pages: "
                      f"{shown}{more}")
        if ok:
            print(f"{a.file}: OK" + (f", RAM equal to {a.against}" if a.against else ""))
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("convert", help="convert between sequential stream and mapped-ram")
    s.add_argument("input")
    s.add_argument("output", help="output file, or - for stdout (stream only)")
    s.add_argument("--to", required=True, choices=("mapped-ram", "stream"))
    s.add_argument("--offset", type=_size, default=0,
                   help="write the stream at this offset of OUT (like file:PATH,offset=N)")
    s.add_argument("--input-offset", type=_size, default=None,
                   help="stream start in IN (default: found automatically)")
    s.add_argument("--force", action="store_true", help="replace an existing OUT")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("verify", help="check a save file; compare guest RAM of two files")
    s.add_argument("file")
    s.add_argument("--against", metavar="OTHER", help="compare guest RAM with this file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)


_EXTRA.append(register)
