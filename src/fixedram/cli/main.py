"""``fixedram`` command line: thin wrappers over the library.

Every failure the user can cause prints one line on stderr and exits
non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..errors import FixedramError, UsageError

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _size(text: str) -> int:
    """``4096``, ``64k``, ``1M``, ``2G`` (QEMU's size suffixes), at most what an off_t holds."""
    from ..sizes import SizeError, parse_size

    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ram_size(text: str) -> int:
    """Guest RAM: a size that is a positive multiple of the 4 KiB page."""
    n = _size(text)
    from ..format.constants import TARGET_PAGE_SIZE

    if n <= 0 or n % TARGET_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of 4 KiB")
    return n


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a decimal integer in [lo, hi]."""
    def parse(text: str) -> int:
        t = text.strip()
        digits = t.lstrip("-")
        if not (digits.isascii() and digits.isdigit() and len(t) <= 20) or not lo <= int(t) <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer from {lo} to {hi}")
        return int(t)
    return parse


def number_in(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi] (never nan or inf)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not lo <= v <= hi:  # also false for nan
            raise argparse.ArgumentTypeError(f"{text!r} is not a number from {lo:g} to {hi:g}")
        return v
    return parse


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..describe import describe
    from ..memory.layout import guest_physical
    from .progress import open_input
    from .status import EXIT_OK, EXIT_UNSOUND

    if a.xml:
        return _print_xml(a.file)
    from ..save import is_qcow2_file

    if a.snapshot is None and is_qcow2_file(a.file):
        return _print_snapshots(a.file, a.json)
    with open_input(a.file, offset=a.offset, snapshot=a.snapshot) as s:
        d = describe(s.walk(), guest_physical(s))
        snap = getattr(s.source, "snapshot", None)
        if snap is not None:  # the VM state of a qcow2 snapshot
            d["snapshot"] = snap.as_dict(getattr(s.source, "start", 0))
    # An incomplete save is described in full, then exits 2: scripts see it is unfinished.
    status = EXIT_OK if d["complete"] else EXIT_UNSOUND
    if a.json:
        json.dump(d, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return status
    from .render import render_inspect

    render_inspect(d)
    return status


def _print_snapshots(path: str, as_json: bool) -> int:
    """The snapshot table of a qcow2 image, as ``qemu-img snapshot -l`` lists it,
    with the snapshots that hold VM state (the saves in it) marked."""
    from ..describe import SCHEMA_VERSION
    from ..io.qcow2 import Qcow2Image
    from .render import printable, snapshot_table

    with Qcow2Image(path) as img:
        snaps = [s.as_dict(img.vm_state_offset(s)) for s in img.snapshots]
        doc = {"schema_version": SCHEMA_VERSION, "file": path, "format": "qcow2",
               "qcow2_version": img.version, "cluster_size": img.cluster_size,
               "virtual_size": img.size, "extended_l2": img.extended_l2,
               "compression_type": ("zstd" if img.compression_type else "zlib"),
               "encrypted": bool(img.crypt_method), "backing_file": img.backing_file,
               "data_file": img.data_file, "snapshots": snaps}
        lines = snapshot_table(img.snapshots)
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    n = sum(1 for s in snaps if s["has_vm_state"])
    print(printable(f"{path}: qcow2 v{doc['qcow2_version']} image, "
                    f"{doc['cluster_size'] >> 10} KiB clusters, {len(snaps)} internal "
                    f"snapshots, {n} with VM state (read one with --snapshot ID|TAG)"))
    if not snaps:
        if doc["backing_file"]:
            print(printable(f"backing file {doc['backing_file']}: backing files never hold "
                            "the VM state of this image"))
        return 0
    for line in lines:
        print(printable(line))
    return 0


def _print_xml(path: str) -> int:
    """The domain XML of a libvirt image, as stored (``virsh save-image-dumpxml``)."""
    from ..save import open_save

    with open_save(path) as s:
        if s.libvirt is None:
            raise UsageError(f"{s.path}: not a libvirt save image, so it holds no domain XML")
        xml = s.libvirt.xml_raw
    sys.stdout.buffer.write(xml if xml.endswith(b"\n") else xml + b"\n")
    return 0


def cmd_extract(a: argparse.Namespace) -> int:
    from ..memory.extract import extract, total_bytes
    from .progress import open_input, progress_bar

    if a.compress is not None and a.format != "kdump":
        raise UsageError("--compress is for --format kdump (the other formats are not "
                         "compressed; pipe physical or elf output to a compressor)")
    with open_input(a.file, offset=a.offset, snapshot=a.snapshot) as s:
        total = total_bytes(s) if s.random_access else 0  # one pass: not known beforehand
        with progress_bar("extracting", total) as prog:
            extract(s, a.output, a.format, force=a.force, allow_incomplete=a.allow_incomplete,
                    progress=prog, stdout=sys.stdout.buffer, compress=a.compress)
    return 0


class _Version(argparse.Action):
    """``--version`` on stdout, as argparse's own version action prints it."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        _print_version()
        parser.exit()


def _print_version() -> None:
    from .._version import __version__

    sys.stdout.write(f"fixedram {__version__}\n")


INSPECT_EPILOG = """\
examples:
  fixedram inspect guest.mig                 blocks, pages, passes and devices of a save
  fixedram inspect guest.sav --json          one JSON object (libvirt images in any format)
  fixedram inspect guest.sav --xml           the domain XML of a libvirt save image
  zstd -dc guest.sav.zst | fixedram inspect -
  fixedram inspect disk.qcow2                the internal snapshots, as qemu-img snapshot -l
  fixedram inspect disk.qcow2 --snapshot s1  the VM state of snapshot s1 (savevm s1)

exit status: 0 a complete save, 1 could not read it (or bad options), 2 a malformed or
  incomplete save (an incomplete one is described all the same), 128+N stopped by signal N
"""

EXTRACT_EPILOG = """\
examples:
  fixedram extract guest.mig -o ram/                      one file per RAMBlock
  fixedram extract guest.mig --format physical -o ram.img  guest-physical image
  fixedram extract guest.mig --format elf -o core.elf      ELF core for gdb, drgn, volatility3
  fixedram extract guest.mig --format kdump -o vmcore      compressed kdump for crash, drgn
  fixedram extract guest.mig --format physical -o - | zstd > ram.img.zst
"""


class _Parser(argparse.ArgumentParser):
    """argparse with fixedram's status for bad options: 1, "could not" (argparse's
    own 2 means a malformed or incomplete save here; see :mod:`.status`)."""

    def error(self, message: str) -> NoReturn:
        from .status import EXIT_FAILED

        self.print_usage(sys.stderr)
        self.exit(EXIT_FAILED, f"{self.prog}: error: {message}\n")


def add_snapshot_option(s: Any, more: str = "") -> None:
    """``--snapshot ID|TAG``: which internal snapshot of a qcow2 image is the save."""
    s.add_argument("--snapshot", metavar="ID|TAG", default=None,
                   help="in a qcow2 image, the internal snapshot whose VM state is the save "
                   "(savevm); may be omitted when only one holds VM state"
                   + (f"; {more}" if more else ""))


class _Unused:
    """Stands in for the parser of a command that is not being run."""

    def add_argument(self, *args: Any, **kw: Any) -> None:
        pass

    def set_defaults(self, **kw: Any) -> None:
        pass


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line. Each command module adds its own subcommands;
    they are imported here, and import only argparse-level things at the top.

    :param only: build just this command's parser (the one being run): the
        others' parsers and help texts cost every command about 10 ms. None
        when ``only`` names no command.
    """
    from . import bridge, completion, engine, state, tools
    from . import map as map_cli

    p = _Parser(prog="fixedram", description="QEMU fixed-ram (mapped-ram) "
                                "migration files: inspect, extract, convert, verify, migrate.")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only is not None:
        add = sub.add_parser
        found: list[str] = []

        def add_only(name: str, **kw: Any) -> Any:
            if name != only:
                return _Unused()
            found.append(name)
            return add(name, **kw)

        sub.add_parser = add_only  # type: ignore[method-assign]

    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("inspect", help="describe a migration or save file",
                       epilog=INSPECT_EPILOG, formatter_class=raw)
    s.add_argument("file", help="the file (a libvirt image in any format), or - for stdin")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--xml", action="store_true",
                   help="print the domain XML of a libvirt image (as virsh save-image-dumpxml)")
    s.add_argument("--offset", type=_size, default=None,
                   help="stream start in the file (default: found automatically)")
    add_snapshot_option(s, "without it, a qcow2 image's snapshots are listed")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("extract", help="write guest RAM out of a migration file",
                       epilog=EXTRACT_EPILOG, formatter_class=raw)
    s.add_argument("file", help="the file (a libvirt image in any format), or - for stdin")
    s.add_argument("-o", "--output", required=True,
                   help="directory (raw) or file (physical, elf, kdump); - for stdout (physical, "
                   "elf: written in order, holes as zeros)")
    s.add_argument("--format", choices=("raw", "physical", "elf", "kdump"), default="raw",
                   help="kdump: makedumpfile's compressed format, zero pages left out")
    s.add_argument("--compress", choices=("zlib", "lzo", "snappy", "zstd", "none"),
                   default=None, help="page codec of --format kdump (default zlib, which "
                   "crash, makedumpfile and drgn all read; makedumpfile reads no snappy or "
                   "zstd)")
    s.add_argument("--offset", type=_size, default=None)
    s.add_argument("--force", action="store_true", help="replace existing outputs")
    s.add_argument("--allow-incomplete", action="store_true",
                   help="extract a save that has no EOF marker (unfinished)")
    add_snapshot_option(s)
    s.set_defaults(func=cmd_extract)

    for module in (tools, engine, bridge, state, map_cli, completion):
        module.register(sub)
    from .status import EXIT_STATUS_HELP

    for cmd in sub.choices.values():  # one exit-status scheme, said by every command
        if "exit status" not in (cmd.epilog or ""):
            cmd.epilog = EXIT_STATUS_HELP + ("\n" + cmd.epilog if cmd.epilog else "")
            cmd.formatter_class = raw
    if only is not None and not found:
        return build_parser()
    return p



class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt.

    Being a KeyboardInterrupt, it unwinds through every ``finally`` and
    ``except BaseException`` cleanup (temporary outputs removed, worker
    threads stopped) and is never taken for an ordinary error.
    """

    def __init__(self, signo: int) -> None:
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


_CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _SignalGuard:
    """While a command runs: the first SIGINT/SIGTERM/SIGHUP raises in the main
    thread; a second one, if cleanup has not finished, removes the listed
    temporaries at once and exits."""

    def __init__(self) -> None:
        self.prev: dict[int, Any] = {}
        self.hit = False

    def __enter__(self) -> _SignalGuard:
        for sig in _CAUGHT:
            try:
                if signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # nohup, or a shell's background job: stay ignored
                self.prev[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, h in self.prev.items():
            signal.signal(sig, h)

    def _handle(self, signo: int, frame: object) -> None:
        if self.hit:
            from ..output import remove_temporaries

            remove_temporaries()
            sys.stderr.write(f"fixedram: {signal.Signals(signo).name} again; stopped\n")
            sys.stderr.flush()
            os._exit(128 + signo)
        self.hit = True
        if signo == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signo)


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
        _print_version()  # without building the parser: no command module imported
        return 0
    args = list(sys.argv[1:] if argv is None else argv)
    # The command's own parser only; the whole one for top-level options and errors.
    p = build_parser(args[0] if args and not args[0].startswith("-") else None)
    a = p.parse_args(args)
    with _SignalGuard():
        try:
            return _run(a)
        except KeyboardInterrupt as e:  # a signal just after the command ended
            return _interrupted(e)


def _run(a: argparse.Namespace) -> int:
    from .render import printable

    try:
        rc: int = a.func(a)
        return rc
    except FixedramError as e:
        print(f"fixedram: error: {printable(e)}", file=sys.stderr)
        return _error_status(a, e)
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except BrokenPipeError:
        return 1
    except OSError as e:
        name = f"{e.filename}: " if e.filename else ""
        print(f"fixedram: error: {printable(name)}{e.strerror or e}", file=sys.stderr)
        return _error_status(a, e)


def _error_status(a: argparse.Namespace, e: BaseException) -> int:
    """The status for ``e`` in the scheme of :mod:`.status` (``verify --against``
    follows ``qemu-img compare``)."""
    from .status import failure_status

    return failure_status(e, comparing=getattr(a, "comparing", False))


def _interrupted(e: KeyboardInterrupt) -> int:
    """Exit status 128 + signal number, after removing any temporary left."""
    from ..output import remove_temporaries

    remove_temporaries()
    signo = getattr(e, "signo", signal.SIGINT)
    print(f"fixedram: interrupted ({signal.Signals(signo).name}); temporary files removed",
          file=sys.stderr)
    return 128 + signo


if __name__ == "__main__":
    sys.exit(main())
