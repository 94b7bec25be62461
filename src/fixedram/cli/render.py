"""Human-readable rendering of inspect results (rich tables).

Names in a migration file (RAMBlocks, devices, the machine type) and names
sent by a peer are untrusted: a name holding an escape sequence could retitle
the terminal, move the cursor or hide text. Every such string goes through
:func:`printable` before it is shown, and into rich as :class:`~rich.text.Text`
(never as markup, where ``[`` would be read as style). Importing this
module for :func:`printable` alone does not load rich.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

__all__ = ["guest_physical_text", "human_bytes", "printable", "render_inspect"]


def printable(s: object) -> str:
    """``s`` with every non-printable character (C0/C1 controls such as ESC,
    DEL, bidi overrides, zero-width and other format characters, line
    separators) written as a Python escape (``\\x1b``, ``\\u202e``).
    Printable text, including non-ASCII letters, is left as it is."""
    t = str(s)
    if t.isprintable():
        return t
    return "".join(c if c.isprintable() else _escape(c) for c in t)


def _escape(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _t(s: object, style: str = "") -> Text:
    from rich.text import Text

    return Text(printable(s), style=style)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def guest_physical_text(ranges: list[dict[str, int]]) -> str:
    """A block's guest-physical ranges: ``0x0-0x7fffffff, 0x100000000-0x17fffffff (+0x80000000)``
    (the part from block offset 0x80000000), or ``-`` where the guest does not see it."""
    parts = []
    for r in ranges:
        p = f"0x{r['gpa']:x}-0x{r['gpa'] + r['length'] - 1:x}"
        parts.append(p + (f" (+0x{r['block_offset']:x})" if r["block_offset"] else ""))
    return ", ".join(parts) or "-"


def render_inspect(d: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    c = Console()
    head = _t(d["file"], "bold")
    head.append(f": {d['format']} migration stream at offset {d['stream_offset']}, machine ")
    head.append(printable(d["machine"]))
    c.print(head)
    caps = ", ".join(printable(x) for x in d["capabilities"]) or "(none recorded)"
    c.print(Text(f"capabilities: {caps}; complete: {'yes' if d['complete'] else 'NO'}"))
    if "libvirt" in d:
        lv = d["libvirt"]
        fmt = printable(lv["image_format"])
        cookie = "no cookie" if lv["cookie_bytes"] is None else f"cookie {lv['cookie_bytes']} B"
        c.print(Text(f"libvirt save image v{lv['version']}, format {fmt}, "
                     f"{'complete' if lv['complete'] else 'UNFINISHED'}, "
                     f"{'was running' if lv['was_running'] else 'was paused'}; domain XML "
                     f"{lv['xml_bytes']} B, {cookie}, data_len {lv['data_len']}, QEMU data at "
                     f"byte {lv['data_offset']}"))
    if d.get("compression"):
        c.print(Text(f"{printable(d['compression'])}-compressed: read in one pass; offsets "
                     "are in the decompressed stream"))
    elif d.get("one_pass"):
        c.print(Text("read in one pass from a pipe"))
    if "error" in d:
        c.print(Text.assemble(("stopped early:", "red"), " ", printable(d["error"])))
    t = Table(title="RAMBlocks")
    for col in ("idstr", "used_length", "pages", "present", "zero", "file offsets",
                "guest-physical"):
        t.add_column(col, justify="right" if col in ("used_length", "pages", "present", "zero")
                     else "left", overflow="fold")
    for b in d["blocks"]:
        where = (f"bitmap 0x{b['bitmap_offset']:x}, pages 0x{b['pages_offset']:x}"
                 if "pages_offset" in b else f"record 0x{b['record_offset']:x}")
        t.add_row(_t(b["idstr"]), human_bytes(b["used_length"]), str(b["pages"]),
                  str(b["pages_present"]), "-" if b["zero_pages"] is None else str(b["zero_pages"]),
                  where, guest_physical_text(b["guest_physical"]))
    c.print(t)
    if "guest_physical_error" in d:
        c.print(Text(f"guest-physical placement not known: {printable(d['guest_physical_error'])}"))
    if d["format"] == "stream":
        c.print(f"passes (most copies of one page): {d['passes']}; RAM sections: "
                f"{d['ram_sections']}; bytes spent on re-sent pages: "
                f"{human_bytes(d['resent_bytes'])}")
    c.print(f"devices: {len(d['devices'])} sections; vmdesc trailer: "
            f"{'yes' if d['vmdesc'] else 'no'}")
    if "snapshot" in d:
        sn = d["snapshot"]
        c.print(Text(f"qcow2 internal snapshot {printable(sn['id'])} "
                     f"({printable(sn['tag'])}): VM state of {sn['vm_state_size']} bytes at "
                     f"virtual offset 0x{sn['vm_state_offset']:x}; offsets above are in it"))
        c.print(f"VM state: {human_bytes(d['apparent_bytes'])}, "
                f"{human_bytes(d['allocated_bytes'])} of image clusters")
    elif d["apparent_bytes"] is not None:
        c.print(f"file size: {human_bytes(d['apparent_bytes'])} apparent, "
                f"{human_bytes(d['allocated_bytes'])} allocated")


def qemu_size(n: int) -> str:
    """A size as QEMU's ``size_to_str`` writes it: three significant digits, binary units."""
    import math

    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = min((math.frexp(n / (1000 / 1024))[1] - 1) // 10, len(units) - 1) if n else 0
    return f"{n / (1 << (10 * i)):0.3g} {units[i]}"


def snapshot_table(snaps: Sequence[Any]) -> list[str]:
    """Lines of a qcow2 snapshot table in ``qemu-img snapshot -l``'s columns (QEMU 10),
    plus one: whether the snapshot holds VM state (a save fixedram reads)."""
    import time

    fmt = "%-7s %-16s %8s %19s %15s %10s  %s"
    out = [fmt % ("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT", "SAVE")]
    for s in snaps:
        secs, ms = divmod(s.vm_clock_ns // 1_000_000, 1000)
        clock = f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        out.append(fmt % (s.id, s.tag, qemu_size(s.vm_state_size), date, clock,
                          "--" if s.icount is None else str(s.icount),
                          "VM state" if s.has_vm_state else "disk only"))
    return out
