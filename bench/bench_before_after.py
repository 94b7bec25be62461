"""The same commands on the same inputs, with fixedram at an earlier commit and now.

What a change costs (issue 9 asks hardening to cost at most 3%): the earlier tree is checked
out with ``git worktree`` under ``build/bench/base`` and run with ``PYTHONPATH`` pointing at its
``src``; both trees use this venv's Python and libraries. Runs are interleaved (base, now, now,
base, ...) on a warm cache, from compiled bytecode as installed copies run; medians of ``--reps``.

    python bench/make_inputs.py
    python bench/bench_before_after.py --base db6f1cb --reps 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from benchlib import INPUTS, ROOT, WORK, bytecode, drop_caches, median, remove, run, warm

OUT = WORK / "before-after"

# (name, arguments after "fixedram", output to remove before each run)
COMMANDS: list[tuple[str, list[str], Path | None]] = [
    ("inspect stream", ["inspect", "--json", str(INPUTS / "stream.mig")], None),
    ("inspect mapped", ["inspect", "--json", str(INPUTS / "mapped.mig")], None),
    ("extract physical stream", ["extract", str(INPUTS / "stream.mig"), "--format", "physical",
                                 "-o", str(OUT / "s.img"), "--force"], OUT / "s.img"),
    ("extract physical mapped", ["extract", str(INPUTS / "mapped.mig"), "--format", "physical",
                                 "-o", str(OUT / "m.img"), "--force"], OUT / "m.img"),
    ("extract raw stream", ["extract", str(INPUTS / "stream.mig"), "-o", str(OUT / "raw"),
                            "--force"], OUT / "raw"),
    ("convert stream->mapped", ["convert", str(INPUTS / "stream.mig"), str(OUT / "c.mig"),
                                "--to", "mapped-ram", "--force"], OUT / "c.mig"),
    ("convert mapped->stream", ["convert", str(INPUTS / "mapped.mig"), str(OUT / "d.mig"),
                                "--to", "stream", "--force"], OUT / "d.mig"),
]


def worktree(ref: str) -> Path:
    base = WORK / "base"
    if base.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                       check=False, capture_output=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), ref],
                   check=True, capture_output=True)
    return base


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the earlier commit")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", help="run only commands whose name contains this")
    p.add_argument("--settle", action="store_true",
                   help="drop the page cache and read the inputs back before every run: "
                        "a run that writes 1 GiB otherwise pays for reclaiming whatever "
                        "else is cached, which varies from run to run")
    a = p.parse_args()
    for f in ("stream.mig", "mapped.mig"):
        if not (INPUTS / f).exists():
            sys.exit(f"missing {INPUTS / f}: run bench/make_inputs.py first")
    OUT.mkdir(parents=True, exist_ok=True)
    trees = {"base": worktree(a.base) / "src", "now": ROOT / "src"}
    bytecode(*trees.values())
    warm(INPUTS / "stream.mig", INPUTS / "mapped.mig")
    print(f"base = {a.base}, now = {subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}; medians of {a.reps}, warm cache")  # noqa: E501
    print(f"{'command':28} {'base s':>8} {'now s':>8} {'now/base':>9}")
    for name, args, out in COMMANDS:
        if a.only and a.only not in name:
            continue
        times: dict[str, list[float]] = {"base": [], "now": []}
        for rep in range(a.reps):
            # ABBA order: the run after another pays for the other's output being freed.
            order = list(trees.items())
            for which, src in order if rep % 2 == 0 else order[::-1]:
                env_path = os.environ.get("PYTHONPATH", "")
                os.environ["PYTHONPATH"] = f"{src}:{env_path}" if env_path else str(src)
                try:
                    cmd = [sys.executable, "-m", "fixedram.cli.main", *args]
                    if a.settle:
                        if out is not None:
                            remove(out)
                        drop_caches()
                        warm(*(Path(x) for x in args if x.startswith(str(INPUTS))))
                    times[which].append(run(cmd, cold=False, out=out).seconds)
                finally:
                    os.environ["PYTHONPATH"] = env_path
                if out is not None:
                    remove(out)
        b, n = median(times["base"]), median(times["now"])
        print(f"{name:28} {b:8.3f} {n:8.3f} {n / b:9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
