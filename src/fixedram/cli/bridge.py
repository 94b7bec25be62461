"""``receive`` and ``send`` subcommands (the live-migration bridge)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import TransportError
from .main import _size, add_snapshot_option, int_in, number_in


def cmd_receive(a: argparse.Namespace) -> int:
    from ..bridge.receive import libvirt_header_of, receive
    from .progress import progress_bar
    from .render import printable

    # Read before listening: a wrong FROM.sav fails at once, not after the migration.
    lv = libvirt_header_of(a.libvirt_header) if a.libvirt_header else None

    def listening(addr: str) -> None:
        print(f"fixedram: listening on {addr}", file=sys.stderr, flush=True)

    def dropped(peer: str, why: str) -> None:
        print(f"fixedram: closed a connection from {peer}: {printable(why)}", file=sys.stderr,
              flush=True)

    # Bytes received against the guest's RAM size once its RAMBlocks have arrived (a live
    # migration's own total is never known: re-dirtied pages are sent again).
    with progress_bar("receiving", None) as bar:
        s = receive(a.source, a.output, force=a.force, multifd_channels=a.multifd_channels,
                    on_listening=listening, accept_timeout=a.accept_timeout,
                    on_dropped=dropped, libvirt_header=lv, progress=bar,
                    on_total=bar.set_total if bar is not None else None,
                    **({} if a.peer_timeout is None else {"peer_timeout": a.peer_timeout}))
    if a.json:
        json.dump(s.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"{a.output}: {printable(s.machine)}, {s.ram_bytes >> 20} MiB RAM; received "
              f"{s.bytes_received / (1 << 20):.1f} MiB in {s.seconds:.1f} s, {s.passes} passes, "
              f"{s.pages_rewritten} pages rewritten; file {s.apparent_bytes / (1 << 20):.1f} MiB "
              f"({s.allocated_bytes / (1 << 20):.1f} MiB allocated)", file=sys.stderr)
    return 0


def cmd_send(a: argparse.Namespace) -> int:
    if a.postcopy:
        return _send_postcopy(a)
    if a.postcopy_bandwidth is not None:
        raise TransportError("--postcopy-bandwidth needs --postcopy")
    from ..bridge.send import send
    from .progress import progress_bar

    uuid = bytes(16)
    if a.uuid:
        import uuid as uuidlib

        try:
            uuid = uuidlib.UUID(a.uuid).bytes
        except ValueError:
            raise TransportError(f"--uuid {a.uuid!r} is not a UUID") from None
    if a.multifd_channels and a.destination == "-":
        raise TransportError("--multifd-channels needs a tcp: or unix: destination")
    if a.multifd_compression != "none" and not a.multifd_channels:
        raise TransportError("--multifd-compression needs --multifd-channels")
    with progress_bar("sending", None) as bar:  # its total: once the file is read
        s = send(a.file, a.destination, stdout=sys.stdout.buffer, offset=a.offset,
                 multifd_channels=a.multifd_channels, uuid=uuid,
                 multifd_compression=a.multifd_compression, progress=bar,
                 on_total=bar.set_total if bar is not None else None, snapshot=a.snapshot)
    if a.json:
        json.dump(s.as_dict(), sys.stderr if a.destination == "-" else sys.stdout, indent=2)
        (sys.stderr if a.destination == "-" else sys.stdout).write("\n")
    return 0


def _send_postcopy(a: argparse.Namespace) -> int:
    from ..bridge.postcopy import check_postcopy_destination, send_postcopy
    from .progress import progress_bar

    check_postcopy_destination(a.destination)  # before the file is read
    if a.multifd_channels or a.multifd_compression != "none":
        # QEMU 10.0 refuses postcopy-ram with multifd as well.
        raise TransportError("--postcopy cannot be combined with --multifd-channels")
    with progress_bar("sending", None) as bar:
        s = send_postcopy(a.file, a.destination, offset=a.offset,
                          bandwidth=a.postcopy_bandwidth, progress=bar,
                          on_total=bar.set_total if bar is not None else None)
    if a.json:
        json.dump(s.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


RECEIVE_EPILOG = """\
examples:
  fixedram receive tcp::4444 -o guest.mig       then in QEMU's monitor: migrate tcp:127.0.0.1:4444
  fixedram receive unix:/tmp/mig.sock -o guest.mig --multifd-channels 4
  (QMP) migrate {"uri": "exec:fixedram receive - -o guest.mig"}
  fixedram receive unix:/tmp/mig.sock -o new.sav --libvirt-header old.sav
                                                then: virsh restore new.sav
"""

SEND_EPILOG = """\
examples:
  fixedram send guest.mig tcp:127.0.0.1:4444    into qemu-system-x86_64 ... -incoming tcp::4444
  fixedram send guest.mig unix:/tmp/in.sock --multifd-channels 4
  qemu-system-x86_64 ... -incoming "exec:fixedram send guest.mig -"
  fixedram send --postcopy guest.mig tcp:127.0.0.1:4444
                         the guest runs at once; its RAM follows (QEMU: -incoming defer,
                         migrate-set-capabilities postcopy-ram on, migrate-incoming tcp:...)
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("receive", help="receive a live QEMU migration into a mapped-ram file",
                       epilog=RECEIVE_EPILOG, formatter_class=raw)
    s.add_argument("source", metavar="URI",
                   help="tcp:[HOST]:PORT (HOST defaults to 127.0.0.1), unix:PATH, or - for "
                        "stdin (QEMU: migrate \"exec:fixedram receive - -o FILE\")")
    s.add_argument("-o", "--output", required=True, help="mapped-ram file to write")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--multifd-channels", type=int_in(1, 255), default=None, metavar="N",
                   help="the source's multifd-channels (default: detected)")
    s.add_argument("--accept-timeout", type=number_in(0.001, 1e7), default=None,
                   metavar="SECONDS",
                   help="give up if no migration has started after this long (default: keep "
                        "listening, like QEMU's -incoming)")
    # The default is bridge.net's PEEK_TIMEOUT, not imported here: --help needs no socket
    # module (tests check the text says the same number).
    s.add_argument("--peer-timeout", type=number_in(0.001, 1e7), default=None,
                   metavar="SECONDS",
                   help="close a connection that sends nothing like QEMU's first bytes "
                        "within this long (default 10)")
    s.add_argument("--libvirt-header", default=None, metavar="FROM.sav",
                   help="write a libvirt save image (format sparse) that virsh restore loads, "
                        "with the domain XML and cookie of FROM.sav, an existing libvirt save "
                        "image of the same domain (any format)")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    s.set_defaults(func=cmd_receive)

    s = sub.add_parser("send", help="stream a save file into a QEMU started with -incoming",
                       epilog=SEND_EPILOG, formatter_class=raw)
    s.add_argument("file")
    s.add_argument("destination", metavar="URI",
                   help="tcp:HOST:PORT, unix:PATH, or - for stdout (QEMU: -incoming "
                        "\"exec:fixedram send FILE -\")")
    s.add_argument("--offset", type=_size, default=None, help="stream start in FILE")
    s.add_argument("--multifd-channels", type=int_in(0, 255), default=0, metavar="N",
                   help="send with socket multifd on N channels; the destination must have "
                        "capability multifd on and multifd-channels N")
    s.add_argument("--multifd-compression", choices=("none", "zlib", "zstd"), default="none",
                   help="compress the multifd channels' pages as QEMU does (level 1); the "
                        "destination must have the same multifd-compression")
    s.add_argument("--postcopy", action="store_true",
                   help="restore by postcopy: the guest runs on the destination as soon as "
                        "its devices are loaded, pages it touches are served first (needs "
                        "tcp: or unix:, and capability postcopy-ram on at the destination)")
    s.add_argument("--postcopy-bandwidth", type=_size, default=None, metavar="BYTES",
                   help="per second, for the pages pushed in the background (requested "
                        "pages are never held back)")
    s.add_argument("--uuid", default=None,
                   help="the destination's -uuid (multifd channels are checked against it)")
    s.add_argument("--json", action="store_true")
    add_snapshot_option(s)
    s.set_defaults(func=cmd_send)

