"""Shared helpers of the format-core benchmarks: timed child processes, cache policy."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "bench"
INPUTS = WORK / "inputs"
MIB = 1 << 20
FIXEDRAM = str(Path(sys.executable).with_name("fixedram"))


@dataclass
class Sample:
    seconds: float
    maxrss: int  # bytes, of this child only (wait4)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def bytecode(*trees: Path) -> None:
    """Compile ``trees`` and let children use the bytecode, as an installed package does.

    With PYTHONDONTWRITEBYTECODE set every run would compile the sources again, a cost
    that grows with the code's size and that no installed copy pays.
    """
    import compileall

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    for t in trees:
        compileall.compile_dir(str(t), quiet=1)


def warm(*paths: Path) -> None:
    """Read files into the page cache (the 'warm' policy)."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(16 * MIB):
                pass


def remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def run(cmd: list[str], *, cold: bool, out: Path | None = None) -> Sample:
    """Run ``cmd`` once: output removed and dirty data synced first (untimed), then either
    the page cache dropped (cold) or not (warm). Returns wall time and the child's peak RSS."""
    if out is not None:
        remove(out)
    subprocess.run(["sync"], check=True)
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{cmd} exited with {p.returncode}")
    return Sample(dt, ru.ru_maxrss * 1024)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def baseline_rss() -> int:
    """Peak RSS of a child that only imports numpy and the fixedram CLI."""
    return run([sys.executable, "-c", "import numpy, fixedram.cli.main"], cold=False).maxrss


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def options(doc: str, names: Iterable[str],
            extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every file benchmark takes (``--reps``, ``--cold``, ``--json``, and
    ``extra``'s), after checking that the inputs ``INPUTS/<name>.mig`` exist; warms
    them into the page cache unless ``--cold``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop caches before every run")
    ap.add_argument("--json", action="store_true")
    if extra is not None:
        extra(ap)
    a = ap.parse_args()
    bytecode(ROOT / "src")
    paths = [INPUTS / f"{n}.mig" for n in names]
    if not all(p.exists() for p in paths):
        sys.exit("inputs missing: run python bench/make_inputs.py first")
    if not a.cold:
        warm(*paths)
    return a

