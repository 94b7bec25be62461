"""Sizes and offsets given as text: one reader for the command line and for URIs.

The grammar is QEMU's ``qemu_strtosz`` (``4096``, ``4k``, ``1.5M``, ``0x1000``;
suffixes B K M G T P E, powers of 1024; a fraction needs a suffix and the
result is truncated), plus ``KiB``-style spellings. Unlike QEMU the value is
computed exactly (no trip through a double) and bounded before anything uses
it: an offset or a size ends up in ``off_t``, so nothing above
:data:`OFF_T_MAX` is accepted, and the digits are counted before they are
converted, so ``1e999``, ``inf`` or a thousand-digit number cannot reach
``int()`` or ``float()``.
"""

from __future__ import annotations

import errno
import re

from .errors import UsageError

__all__ = ["OFF_T_MAX", "SizeError", "parse_size"]

OFF_T_MAX = (1 << 63) - 1
_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_MAX_DIGITS = 30  # longer than any value below 2^63 with its fraction, in any unit
_DEC = re.compile(r"([0-9]+)(?:\.([0-9]+))?(?:([kmgtpe])(?:i?b)?|(b))?", re.IGNORECASE | re.ASCII)
_HEX = re.compile(r"0x([0-9a-f]+)", re.IGNORECASE | re.ASCII)


class SizeError(UsageError, ValueError):
    """Text that is not a size, or one too large.

    :ivar errno: ``EINVAL`` (not a size) or ``ERANGE`` (too large), the two
        errors QEMU reports for a bad size.
    """

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


def parse_size(text: str, *, limit: int = OFF_T_MAX) -> int:
    """The number of bytes ``text`` names.

    :param limit: the largest value accepted (default: what an ``off_t`` holds).
    :raise SizeError: not a size (``EINVAL``) or larger than ``limit`` (``ERANGE``).
    """
    t = text.strip()
    if len(t) > _MAX_DIGITS + 8:
        raise SizeError(f"{_show(text)} is too long to be a size", errno.ERANGE)
    m = _HEX.fullmatch(t)
    if m:
        digits = m.group(1).lstrip("0")
        if len(digits) > 16:
            raise SizeError(f"{_show(text)} is larger than {limit}", errno.ERANGE)
        value = int(digits or "0", 16)
    else:
        m = _DEC.fullmatch(t)
        if m is None:
            raise SizeError(f"{_show(text)} is not a size (e.g. 4096, 64k, 1.5M, 0x1000)",
                            errno.EINVAL)
        whole, frac, suffix = m.group(1).lstrip("0"), m.group(2) or "", m.group(3) or ""
        if len(whole) + len(frac) > _MAX_DIGITS:
            raise SizeError(f"{_show(text)} is larger than {limit}", errno.ERANGE)
        if frac and not suffix:
            raise SizeError(f"{_show(text)}: a fraction needs a unit suffix (k, M, G...)",
                            errno.EINVAL)
        shift = _SUFFIX[suffix.lower()] if suffix else 0
        value = (int(whole or "0") << shift) + ((int(frac) << shift) // 10 ** len(frac)
                                                if frac else 0)
    if value > limit:
        raise SizeError(f"{_show(text)} is larger than {limit}", errno.ERANGE)
    return value


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")
