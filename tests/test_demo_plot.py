"""``fixedram demo --plot OUT.svg``: both saves' file size against time, drawn from the sizes
sampled while the files were written (the built-in guest; no QEMU needed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FIXEDRAM = [sys.executable, "-m", "fixedram"]
SVG = "{http://www.w3.org/2000/svg}"
# A small guest re-dirtied at twice the save's bandwidth: the stream outgrows RAM.
DEMO = ["demo", "--ram", "16M", "--max-bandwidth", "64M", "--workload-rate", "128M",
        "--max-passes", "4"]


def _points(g: ET.Element) -> list[tuple[float, float]]:
    path = g.find(f"{SVG}path")
    assert path is not None
    nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", path.get("d", ""))]
    return list(zip(nums[0::2], nums[1::2], strict=True))


def test_demo_plot(tmp_path: Path) -> None:
    out = tmp_path / "sizes.svg"
    r = subprocess.run([*FIXEDRAM, *DEMO, "--plot", str(out), "--json"], cwd=tmp_path,
                       capture_output=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # no terminal: no bar
    doc = json.loads(r.stdout)
    runs = {run["mode"]: run for run in doc["runs"]}
    assert set(runs) == {"stream", "fixed-ram"}
    assert all(run["verified"] for run in runs.values())
    for run in runs.values():
        series = run["size_series"]
        assert series[0] == [0, 0] and len(series) >= 5
        assert series[-1][1] == run["apparent_bytes"]  # the committed file
        assert [t for t, _ in series] == sorted(t for t, _ in series)
    assert runs["stream"]["apparent_bytes"] > runs["fixed-ram"]["apparent_bytes"]
    # Only the plot and the JSON are left: the demo's files are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sizes.svg"]

    root = ET.parse(out).getroot()
    groups = {g.get("id"): g for g in root.iter(f"{SVG}g")}
    lines = {m: _points(groups[f"series-{m}"]) for m in ("stream", "fixed-ram")}
    (ram_x, ram_y), _ = _points(groups["ram-size"])
    for mode, pts in lines.items():
        assert len(pts) == len(runs[mode]["size_series"])  # one vertex per sample
    # Both start at the origin (0 s, 0 bytes); SVG's y grows downwards.
    (x0, y0), = {pts[0] for pts in lines.values()}
    assert ram_x == x0 and ram_y < y0  # the RAM line starts on the y axis
    ram = runs["stream"]["ram_total_bytes"]

    def size_at(y: float) -> float:  # the axis scale from the origin and the RAM line
        return (y0 - y) / (y0 - ram_y) * ram

    stream_end, fixed_end = lines["stream"][-1][1], lines["fixed-ram"][-1][1]
    assert stream_end < ram_y < y0  # the stream ends above the RAM line
    assert size_at(stream_end) > size_at(fixed_end)
    for mode, pts in lines.items():
        drawn = size_at(pts[-1][1])
        assert abs(drawn - runs[mode]["apparent_bytes"]) < 0.01 * ram, mode
    # The fixed-ram file never outgrows its final size (RAM, header, bitmaps and the
    # alignment of its pages regions), however many passes re-sent pages.
    fixed = runs["fixed-ram"]
    assert fixed["passes"] >= 2
    assert max(size_at(y) for _, y in lines["fixed-ram"]) < fixed["apparent_bytes"] + 0.01 * ram


def test_demo_plot_needs_matplotlib(tmp_path: Path) -> None:
    """Without matplotlib: one line and a failure before any guest runs."""
    out = tmp_path / "sizes.svg"
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # import matplotlib now fails
            "from fixedram.cli.main import main\n"
            f"sys.exit(main({[*DEMO, '--plot', str(out)]!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       timeout=60, check=False)
    assert r.returncode != 0
    assert r.stdout == b""
    assert r.stderr.decode().splitlines() == [
        "fixedram: error: --plot needs matplotlib: pip install 'fixedram[plot]'"]
    assert list(tmp_path.iterdir()) == []  # no demo directory, no plot


def test_demo_plot_existing_output(tmp_path: Path) -> None:
    """An existing OUT is refused before the demo runs (--force replaces it)."""
    out = tmp_path / "sizes.svg"
    out.write_text("mine")
    r = subprocess.run([*FIXEDRAM, *DEMO, "--plot", str(out)], cwd=tmp_path,
                       capture_output=True, timeout=60, check=False)
    assert r.returncode != 0 and r.stdout == b""
    assert r.stderr.decode().splitlines() == [
        f"fixedram: error: {out}: already exists (use --force to replace it)"]
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sizes.svg"]
