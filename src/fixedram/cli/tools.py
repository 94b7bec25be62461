"""``convert`` and ``verify`` subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import FormatError, UsageError
from .main import _size, add_snapshot_option


def cmd_convert(a: argparse.Namespace) -> int:
    from ..tools.convert import convert_file
    from .progress import progress_bar

    total = 0
    if a.output != "-" and sys.stderr.isatty():  # the size is needed only for a bar
        from ..memory.extract import total_bytes
        from ..save import open_save, reads_one_pass

        if not reads_one_pass(a.input):  # one pass: no size beforehand
            with open_save(a.input, offset=a.input_offset, snapshot=a.snapshot) as s:
                total = total_bytes(s)
    with progress_bar("converting", total) as prog:
        convert_file(a.input, a.output, a.to, offset=a.offset, src_offset=a.input_offset,
                     force=a.force, progress=prog, stdout=sys.stdout.buffer, bare=a.bare,
                     snapshot=a.snapshot)
    if a.output == "-":
        sys.stdout.buffer.flush()
    return 0


# Exit statuses of verify, as ``qemu-img compare``: 0 sound (or RAM equal),
# 1 problems found (or RAM differs), 2 the check could not be made.
def cmd_verify(a: argparse.Namespace) -> int:
    from ..save import reads_one_pass
    from .status import COMPARE_DIFFER, COMPARE_UNSOUND, EXIT_OK, EXIT_UNSOUND

    a.comparing = a.against is not None  # errors exit as qemu-img compare's (main)
    one_a = reads_one_pass(a.file)
    one_b = a.against is not None and reads_one_pass(a.against)
    from ..describe import SCHEMA_VERSION

    result: dict[str, object] = {"schema_version": SCHEMA_VERSION, "file": a.file}
    if one_a and a.snapshot is not None:
        raise UsageError(f"{a.file}: --snapshot reads a qcow2 image's internal snapshot, and "
                         "this is not a qcow2 image")
    if one_a or one_b:
        probs, probs_b, diff_objs = _verify_one_pass(a.file, a.against, one_a, one_b)
    else:
        probs, probs_b, diff_objs = _verify_files(a.file, a.against, a.snapshot)
    result.update(problems=probs, sound=not probs)
    diffs = [d.as_dict() for d in diff_objs]
    if a.against:
        result["against"] = a.against
        result["against_problems"] = probs_b
        result["differences"] = diffs
        result["equal"] = not diffs
    if a.against and (probs or probs_b):
        status = COMPARE_UNSOUND  # a comparison of unsound files is not trusted
    elif a.against:
        status = COMPARE_DIFFER if diffs else EXIT_OK
    else:
        status = EXIT_UNSOUND if probs else EXIT_OK
    ok = status == EXIT_OK
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
        for p in probs_b:
            print(f"{a.against}: {p}")
        if ok:
            print(f"{a.file}: OK" + (f", RAM equal to {a.against}" if a.against else ""))
    return status


def _verify_files(path: str, against: str | None,
                  snapshot: str | None = None) -> tuple[list[str], list[str], list[Any]]:
    from ..tools.verify import compare, compare_total, open_checked
    from .progress import open_input, progress_bar

    def indexed(p: str, snap: str | None = None) -> tuple[Any, list[str]]:
        return open_checked(p, opener=open_input, snapshot=snap)

    mf, probs = indexed(path, snapshot)
    if against is None:
        if mf is not None:
            mf.close()
        return probs, [], []
    other, probs_b = indexed(against)
    if mf is None or other is None:
        for m in (mf, other):
            if m is not None:
                m.close()
        raise FormatError("cannot compare: " + "; ".join(probs + probs_b))
    with mf, other, progress_bar("comparing", compare_total(mf, other)) as prog:
        return probs, probs_b, compare(mf, other, progress=prog)


def _verify_one_pass(path: str, against: str | None, one_a: bool,
                     one_b: bool) -> tuple[list[str], list[str], list[Any]]:
    """``path`` or ``against`` read in one pass (a pipe, a compressed image),
    compared page by page with the other, a file, as the pages arrive."""
    from ..save import open_save
    from ..tools.verify import OnePassCompare, open_checked, structural_problems
    from .progress import following, progress_bar

    if one_a and one_b:
        raise UsageError(f"cannot compare {path} with {against}: both must be read in one "
                            "pass (pipes or compressed images); make one of them a file")
    seq, other_path = (path, against) if one_a else (against, path)
    assert seq is not None
    other = None
    other_probs: list[str] = []
    if other_path is not None:
        other, other_probs = open_checked(other_path)
        if other is None:
            raise FormatError("cannot compare: " + "; ".join(other_probs))
    diffs: list[Any] = []
    try:
        target = OnePassCompare(other) if other is not None else None
        try:
            with open_save(seq) as f:
                # Input bytes read (compressed ones for a compressed image) against the
                # input's size; a pipe's is not known beforehand.
                with progress_bar("checking", _input_size(seq)) as prog, \
                        following(prog, lambda: f.bytes_read):
                    f.walk(target)
                probs = structural_problems(f)
                if target is not None:
                    diffs = target.result(f)
        except FormatError as e:
            if other is not None:
                raise FormatError(f"cannot compare: {e}") from e
            probs = [str(e)]
    finally:
        if other is not None:
            other.close()
    if one_a:
        return probs, other_probs, diffs
    for d in diffs:  # the roles were swapped: FILE is "a"
        d.only_in = {"a": "b", "b": "a"}.get(d.only_in or "")
        d.length_a, d.length_b = d.length_b, d.length_a
    return other_probs, probs, diffs


def _input_size(path: str) -> int | None:
    """The size of a regular file (or stdin redirected from one); None for a pipe."""
    import os
    import stat

    try:
        st = os.stat(path) if path != "-" else os.fstat(0)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) and st.st_size > 0 else None


VERIFY_EPILOG = """\
exit status (FILE alone as qemu-img check, --against as qemu-img compare):
  FILE alone:       0 sound, 1 could not be checked (unreadable), 2 problems found
                    (malformed or incomplete)
  --against OTHER:  0 RAM equal, 1 RAM differs, 2 could not compare (unreadable),
                    3 an input is malformed or incomplete (nothing compared is trusted)
  both:             128+N stopped by signal N

examples:
  fixedram verify guest.mig                       structure, completeness, regions
  fixedram verify guest.mapped --against guest.mig --json
  zstd -dc guest.sav.zst | fixedram verify - --against guest.mig
"""


def cmd_define_xml(a: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..tools.define_xml import define_xml

    try:
        with open(a.xml, "rb") as f:
            xml = f.read()
    except OSError as e:
        raise InputError(a.xml, e) from e
    r = define_xml(a.image, xml, xml_name=a.xml)
    how = ("in place" if r.in_place else
           f"by rewriting the image ({r.bytes_written:,} bytes; the XML outgrew its room)")
    print(f"{a.image}: domain XML replaced {how}")
    return 0


DEFINE_XML_EPILOG = """examples:
  virsh save-image-dumpxml vm.sav > vm.xml      (or: fixedram inspect vm.sav --xml > vm.xml)
  fixedram define-xml vm.sav vm.xml             then: virsh restore vm.sav

The header is rewritten in place when the new XML fits the room libvirt left after the old
one (64 KiB); otherwise the image is written anew beside itself and renamed over it when
complete, so an interruption leaves the old image whole.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("define-xml", help="replace the domain XML of a libvirt save image "
                       "(as virsh save-image-define)", epilog=DEFINE_XML_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("image", help="a libvirt save image (virsh save), any format")
    s.add_argument("xml", help="the new domain XML")
    s.set_defaults(func=cmd_define_xml)

    s = sub.add_parser("convert", help="convert between sequential stream and mapped-ram",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  fixedram convert live.stream vm.mapped --to mapped-ram     bounded, sparse; QEMU >= 9.0 loads it
  fixedram convert vm.mapped vm.stream --to stream           for a QEMU without mapped-ram
  fixedram convert vm.sav vm-sparse.sav --to mapped-ram      a libvirt image stays one (sparse)
  fixedram convert vm.mapped - --to stream | qemu ... -incoming exec:cat
""")
    s.add_argument("input", help="the file (a libvirt image in any format), or - for stdin")
    s.add_argument("output", help="output file, or - for stdout (stream only, bare)")
    s.add_argument("--to", required=True, choices=("mapped-ram", "stream"))
    s.add_argument("--offset", type=_size, default=0,
                   help="write the stream at this offset of OUT (like file:PATH,offset=N)")
    s.add_argument("--input-offset", type=_size, default=None,
                   help="stream start in IN (default: found automatically)")
    s.add_argument("--force", action="store_true", help="replace an existing OUT")
    s.add_argument("--bare", action="store_true",
                   help="from a libvirt image, write the plain QEMU file (default: a libvirt "
                   "image with the same domain XML, format raw or sparse)")
    add_snapshot_option(s)
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("verify", help="check a save file; compare guest RAM of two files",
                       epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("file", help="the file (a libvirt image in any format), or - for stdin")
    s.add_argument("--against", metavar="OTHER", help="compare guest RAM with this file")
    s.add_argument("--json", action="store_true")
    add_snapshot_option(s, "of FILE")
    s.set_defaults(func=cmd_verify)


