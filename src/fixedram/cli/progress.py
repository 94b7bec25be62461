"""A progress bar on stderr when it is a terminal, nothing otherwise (scripts read
stdout and stderr). Sizes and speeds are in binary units (KiB, MiB, GiB)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..save import Save

__all__ = ["Bar", "binary_size", "following", "open_input", "progress_bar", "stderr_console"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def binary_size(n: float) -> str:
    """``n`` bytes in binary units: 512 B, 1.5 KiB, 256.0 MiB."""
    for unit in _UNITS[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {_UNITS[-1]}"


class Bar:
    """One task of a rich progress display; calling it advances by ``n`` bytes.

    Library functions take it as their ``progress`` callback (any thread may
    call it: rich's tasks are updated under a lock).
    """

    def __init__(self, progress: Any, task: Any) -> None:
        self._p = progress
        self._task = task

    def __call__(self, n: int) -> None:
        self._p.advance(self._task, n)

    def set_total(self, total: int | None) -> None:
        """Give an indeterminate bar its total (or take it away: None)."""
        self._p.update(self._task, total=total)

    def set_label(self, label: str) -> None:
        self._p.update(self._task, description=label)

    def set_completed(self, done: int) -> None:
        self._p.update(self._task, completed=done)


def stderr_console() -> Any:
    """The rich console progress displays draw on: stderr, never stdout."""
    from rich.console import Console

    return Console(stderr=True)


def _speed_column() -> Any:
    # rich's TransferSpeedColumn has no binary option: this is the same column in KiB/s.
    from rich.progress import ProgressColumn
    from rich.text import Text

    class BinarySpeedColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None:
                return Text("?", style="progress.data.speed")
            return Text(f"{binary_size(speed)}/s", style="progress.data.speed")

    return BinarySpeedColumn()


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Bar | None]:
    """A bar of bytes done against ``total`` on a terminal; None otherwise.

    ``total`` None: an indeterminate bar (bytes and speed) until
    :meth:`Bar.set_total`; 0 (nothing to show, e.g. output to a pipe): no bar.
    """
    if not sys.stderr.isatty() or (total is not None and total <= 0):
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    # stdout is not redirected: it may carry data (convert -, --json) while the bar runs.
    with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(binary_units=True),
                  _speed_column(), TimeRemainingColumn(), console=stderr_console(),
                  transient=True, redirect_stdout=False) as p:
        yield Bar(p, p.add_task(label, total=total))


@contextmanager
def following(bar: Bar | None, counter: Callable[[], int],
              interval: float = 0.1) -> Iterator[None]:
    """Set ``bar`` to ``counter()`` every ``interval`` seconds (from a thread), for
    work that counts its own bytes and takes no callback; nothing without a bar."""
    if bar is None:
        yield
        return
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            bar.set_completed(counter())

    t = threading.Thread(target=run, daemon=True, name="progress")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        bar.set_completed(counter())


def open_input(path: str, **kw: Any) -> Save:
    """:func:`~fixedram.save.open_save` with an "indexing" bar while a file's stream is
    walked: opening a multi-GiB stream reads every record header, which takes seconds on
    a cold cache. (A one-pass input is walked later, by the command.)"""
    import contextlib
    import os

    from ..save import is_qcow2_file, open_save

    size: int | None = 0
    if is_qcow2_file(path):
        size = None  # the VM state's size is known once the image is open
    elif path != "-":
        with contextlib.suppress(OSError):  # open_save names the file in its error
            size = os.stat(path).st_size
    with progress_bar(f"indexing {os.path.basename(path)}", size) as bar:
        return open_save(path, progress=bar, **kw)
