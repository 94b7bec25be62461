"""The fuzzer's short CI budget on real QEMU 10 saves, and its past findings as regressions."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "bench" / "fuzz.py"
REGRESSIONS = sorted((Path(__file__).parent / "fuzz_regressions").glob("*.sav"))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory, qemu: str) -> Path:
    d = tmp_path_factory.mktemp("fuzz-seeds")
    subprocess.run([sys.executable, str(FUZZ), "--make-seeds", str(d)], check=True,
                   timeout=300, capture_output=True)
    assert len(list(d.glob("*.sav"))) == 4
    return d


@pytest.mark.qemu
@pytest.mark.slow
def test_fuzz_short_budget(seeds: Path, tmp_path: Path) -> None:
    """About a minute of mutated real saves: no exception but fixedram's typed errors,
    no input over the time limit, no leftover temporary file."""
    out = tmp_path / "stats.json"
    r = subprocess.run([sys.executable, str(FUZZ), "--seeds", str(seeds), "--seconds", "50",
                        "--crashes", str(tmp_path / "crashes"), "--json", str(out),
                        "--input-timeout", "60"], capture_output=True, text=True, timeout=400)
    stats = json.loads(out.read_text())
    assert stats["inputs"] > 100, r.stdout
    assert not stats["crashes"], json.dumps(stats["crashes"], indent=2)
    assert r.returncode == 0
    # The mutations reached past the header: devices decoded, RAM read, outputs written.
    assert {"devices", "ram", "convert"} <= set(stats["stages"]), stats["stages"]
    assert stats["peak_rss_mib"] < 1024


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_fuzz_regression(path: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(FUZZ.parent))
    import fuzz  # type: ignore[import-not-found]
    from fixedram.errors import FixedramError

    for run in (lambda: fuzz.run_readers(path, tmp_path, True),
                lambda: fuzz.run_receive(path, tmp_path)):
        with contextlib.suppress(FixedramError):
            run()
