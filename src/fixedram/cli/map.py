"""``map`` subcommand: the page map of a save (``qemu-img map`` for migration files)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from ..memory.map import BlockMap

EPILOG = """\
examples:
  fixedram map guest.mig                    extents per RAMBlock, as a table
  fixedram map guest.mig --json | jq '.extents[] | select(.kind == "data")'
  fixedram map live.stream --svg map.svg    the page map as a picture (pip install 'fixedram[plot]')
  gzip -dc guest.mig.gz | fixedram map -     read in one pass: kinds and copies, no file offsets

A stream's data extent holds pages whose records follow each other: page k is at
file_offset + k * (page size + 8). A mapped-ram extent's page k is at file_offset + k * page size.
A zero extent is zero on load: ZERO records, or clear bits of a complete mapped-ram file. A pipe
or a compressed image is mapped in one pass, without file offsets. After the extents, where each
RAMBlock sits in guest-physical memory (pc and q35 machine types).
"""


def cmd_map(a: argparse.Namespace) -> int:
    from ..memory.layout import guest_physical
    from ..memory.map import file_map, json_text
    from .progress import open_input

    if a.svg is not None:
        _check_matplotlib()
    with open_input(a.file, offset=a.offset, snapshot=a.snapshot) as mf:
        maps = file_map(mf)
        unplaced = guest_physical(mf)[1]
        if a.svg is not None:
            _draw(mf.path, mf.format, mf.complete, maps, a.svg, a.force)
        if a.json:
            out = sys.stdout
            for piece in json_text(maps, unplaced):
                out.write(piece)
        elif a.svg is None:
            if not mf.random_access:
                print(f"{mf.path}: read in one pass: a pipe or a compressed stream has no file "
                      "offsets, so none are shown")
            _print_table(maps)
            _print_placement(maps, unplaced)
        if not mf.complete:
            print(f"fixedram: warning: {a.file}: the save is incomplete "
                  f"({mf.error or 'unfinished'}); the map shows what it holds", file=sys.stderr)
    return 0


def _print_table(maps: list[BlockMap]) -> None:
    from .render import printable

    w = sys.stdout.write
    nw = max([len(printable(m.block.idstr)) for m in maps] + [5])
    w(f"{'block':<{nw}} {'start':>12} {'length':>12} {'kind':<6} {'file offset':>12} copies\n")
    for m in maps:
        for e in m.extents():
            off = f"0x{e.file_offset:x}" if e.file_offset is not None else "-"
            w(f"{printable(e.block):<{nw}} {f'0x{e.start:x}':>12} {f'0x{e.length:x}':>12} "
              f"{e.kind:<6} {off:>12} {e.copies}\n")


def _print_placement(maps: list[BlockMap], unplaced: str | None) -> None:
    """Where each block sits in guest-physical memory, after the extents."""
    from .render import guest_physical_text, printable

    w = sys.stdout.write
    if unplaced is not None:
        w(f"\nguest-physical placement not known: {printable(unplaced)}\n")
        return
    nw = max([len(printable(m.block.idstr)) for m in maps] + [5])
    w(f"\n{'block':<{nw}} guest-physical (part from block offset)\n")
    for m in maps:
        ranges = [{"gpa": r.gpa, "block_offset": r.block_offset, "length": r.length}
                  for r in m.guest_physical]
        text = guest_physical_text(ranges) if ranges else "- (not mapped)"
        w(f"{printable(m.block.idstr):<{nw}} {text}\n")


def _check_matplotlib(option: str = "--svg") -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{option} needs matplotlib: pip install 'fixedram[plot]'") from None


# Colours: zero light grey, absent white; data by copies sent (1, 2, 3, 4 and more),
# from blue to red, so re-sent pages show as heat.
_ZERO_RGB = (0.82, 0.82, 0.82)
_ABSENT_RGB = (1.0, 1.0, 1.0)
_DATA_RGB = ((0.12, 0.35, 0.75), (0.98, 0.75, 0.15), (0.93, 0.45, 0.1), (0.8, 0.05, 0.1))
# One picture row per block holds at most this many cells and a block at most _ROWS
# rows; a cell covers several pages when the block is larger (its colour is their mean).
_COLUMNS = 1024
_ROWS = 64


def _cells(m: BlockMap) -> tuple[Any, int]:
    """RGBA image (rows, columns, 4) of one block and the pages per cell."""
    import numpy as np

    from ..memory.map import DATA, ZERO

    n = m.page_kind.size
    per_cell = max(1, -(-n // (_COLUMNS * _ROWS)))
    cells = -(-n // per_cell)
    columns = min(cells, _COLUMNS)
    rows = -(-cells // columns)
    size = rows * columns * per_cell
    kind = np.full(size, -1, dtype=np.int8)  # -1: past the block's end
    kind[:n] = m.page_kind
    copies = np.zeros(size, dtype=np.int64)
    copies[:n] = np.minimum(m.page_copies, len(_DATA_RGB))
    k = kind.reshape(-1, per_cell)
    c = copies.reshape(-1, per_cell)
    rgb = np.zeros((k.shape[0], 3))
    for i, colour in enumerate(_DATA_RGB):
        rgb += ((k == DATA) & (c == i + 1)).mean(axis=1)[:, None] * np.array(colour)
    rgb += (k == ZERO).mean(axis=1)[:, None] * np.array(_ZERO_RGB)
    other = (k > ZERO).mean(axis=1)  # absent (and data with 0 copies, which cannot be)
    rgb += other[:, None] * np.array(_ABSENT_RGB)
    inside = (k >= 0).mean(axis=1)
    rgba = np.concatenate([rgb / np.maximum(inside, 1e-9)[:, None], inside[:, None] > 0],
                          axis=1)
    return rgba.reshape(rows, columns, 4), per_cell


def _draw(path: str, fmt: str, complete: bool, maps: list[BlockMap], out: str,
          force: bool) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..output import AtomicOutput
    from .render import printable

    shown = [m for m in maps if m.page_kind.size]
    images = [_cells(m) for m in shown]
    heights = [max(img.shape[0], 3) for img, _ in images] or [1]
    fig_h = 1.0 + sum(0.55 + h / 32 for h in heights)
    fig, axes = plt.subplots(len(heights), 1, figsize=(11, fig_h), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    title = f"{os.path.basename(path)}: {fmt}{'' if complete else ' (incomplete)'}"
    fig.suptitle(printable(title), fontsize=11, x=0.01, ha="left")
    for ax, m, (img, per_cell) in zip(axes[:, 0], shown, images, strict=True):
        b = m.block
        rows, columns = img.shape[0], img.shape[1]
        ax.imshow(img, aspect="auto", interpolation="nearest")
        row_bytes = columns * per_cell * b.page_size
        xt = sorted({0, columns // 2, columns})
        ax.set_xticks([t - 0.5 for t in xt])
        ax.set_xticklabels([f"+{_human(t * per_cell * b.page_size)}" for t in xt], fontsize=7)
        yt = sorted({0, rows // 2, rows - 1}) if rows > 1 else [0]
        ax.set_yticks(yt)
        ax.set_yticklabels([_human(r * row_bytes) for r in yt], fontsize=7)
        resent = int((m.page_copies > 1).sum())
        ax.set_title(printable(f"{b.idstr}: {_human(b.used_length)}, a cell is "
                               f"{_human(per_cell * b.page_size)}, a row "
                               f"{_human(row_bytes)}; {resent} pages re-sent"),
                     fontsize=8, loc="left")
    if not shown:
        axes[0, 0].set_axis_off()
        axes[0, 0].text(0.5, 0.5, "no RAMBlock", ha="center")
    labels = ("data", "data, 2 copies", "data, 3 copies", "data, 4+ copies")
    handles = [Patch(color=c, label=lb) for c, lb in zip(_DATA_RGB, labels, strict=True)]
    handles += [Patch(color=_ZERO_RGB, label="zero"),
                Patch(facecolor=_ABSENT_RGB, edgecolor="0.5", label="absent")]
    fig.legend(handles=handles, loc="upper right", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig_h))
    fmt_out = "png" if out.endswith(".png") else "svg"
    with AtomicOutput(out, force=force, mode=0o644) as o:
        with os.fdopen(os.dup(o.fd), "wb") as f:
            fig.savefig(f, format=fmt_out, dpi=110)
        o.commit()
    plt.close(fig)


def _human(n: float) -> str:
    """Binary units: 4 KiB, 1 GiB, 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} TiB"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .main import _size, add_snapshot_option

    s = sub.add_parser("map", help="extents of data, zero and absent pages per RAMBlock, "
                       "with file offsets (qemu-img map of a save)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("file", help="a migration file or libvirt save image; - for stdin (a pipe "
                   "or a compressed image is read in one pass, without file offsets)")
    s.add_argument("--json", action="store_true", help='print {"schema_version": 1, '
                   '"extents": [...], "blocks": [...]}')
    s.add_argument("--svg", metavar="OUT", help="draw the page map into OUT (SVG; .png for "
                   "PNG); needs matplotlib")
    s.add_argument("--force", action="store_true", help="replace an existing --svg output")
    s.add_argument("--offset", type=_size, default=None,
                   help="stream start in the file (default: found automatically)")
    add_snapshot_option(s)
    s.set_defaults(func=cmd_map)
