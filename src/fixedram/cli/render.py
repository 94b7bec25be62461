"""Human-readable rendering of inspect results (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["human_bytes", "render_inspect"]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_inspect(d: dict[str, Any]) -> None:
    c = Console()
    c.print(f"[bold]{d['file']}[/bold]: {d['format']} migration stream at offset "
            f"{d['stream_offset']}, machine {d['machine']}")
    c.print(f"capabilities: {', '.join(d['capabilities']) or '(none recorded)'}; "
            f"complete: {'yes' if d['complete'] else 'NO'}")
    if "libvirt" in d:
        lv = d["libvirt"]
        c.print(f"libvirt save image v{lv['version']}, format {lv['image_format']}, "
                f"{'complete' if lv['complete'] else 'UNFINISHED'}")
    if "error" in d:
        c.print(f"[red]stopped early:[/red] {d['error']}")
    t = Table(title="RAMBlocks")
    for col in ("idstr", "used_length", "pages", "present", "zero", "file offsets"):
        t.add_column(col, justify="left" if col in ("idstr", "file offsets") else "right")
    for b in d["blocks"]:
        where = (f"bitmap 0x{b['bitmap_offset']:x}, pages 0x{b['pages_offset']:x}"
                 if "pages_offset" in b else f"record 0x{b['record_offset']:x}")
        t.add_row(b["idstr"], human_bytes(b["used_length"]), str(b["pages"]),
                  str(b["pages_present"]), "-" if b["zero_pages"] is None else str(b["zero_pages"]),
                  where)
    c.print(t)
    if d["format"] == "stream":
        c.print(f"passes (most copies of one page): {d['passes']}; RAM sections: "
                f"{d['ram_sections']}; bytes spent on re-sent pages: "
                f"{human_bytes(d['resent_bytes'])}")
    c.print(f"devices: {len(d['devices'])} sections; vmdesc trailer: "
            f"{'yes' if d['vmdesc'] else 'no'}")
    c.print(f"file size: {human_bytes(d['apparent_bytes'])} apparent, "
            f"{human_bytes(d['allocated_bytes'])} allocated")
