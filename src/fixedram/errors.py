"""The one exception hierarchy of fixedram.

Every error a caller can meet derives from :class:`FixedramError`, so a CLI or
a service needs a single ``except`` clause. Errors about file contents carry
the file name and the byte offset where the problem was found, because the
first thing anyone does with a bad migration file is open it in a hex editor::

    FixedramError
     ├── FormatError               bytes that do not follow the migration format
     │    ├── BadMagic             not a QEMU migration stream / save image
     │    ├── UnsupportedVersion   a version field we do not read
     │    ├── TruncatedFile        the file ends before a structure does
     │    └── CorruptFile          a length, offset or value that cannot be right
     ├── UnsupportedFeature        valid QEMU data that fixedram refuses to decode
     ├── CapabilityError           a capability/parameter rule of QEMU is violated
     ├── TransportError            a URI, socket, pipe or file transport failed
     ├── MigrationError            a migration failed or was cancelled
     └── OutputError               an output file cannot be written safely
"""

from __future__ import annotations

import os

__all__ = [
    "BadMagic",
    "CapabilityError",
    "CorruptFile",
    "FixedramError",
    "FormatError",
    "MigrationError",
    "OutputError",
    "TransportError",
    "TruncatedFile",
    "UnsupportedFeature",
    "UnsupportedVersion",
]


class FixedramError(Exception):
    """Root of every error raised by fixedram."""


class FormatError(FixedramError):
    """Input that does not follow the migration format.

    :param message: what was wrong, in words a user understands.
    :param path: the file (or stream name) the bytes came from.
    :param offset: absolute byte offset in that file where the problem is.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, offset: int | None = None
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        at = f" (at byte offset {self.offset})" if self.offset is not None else ""
        return f"{where}{self.message}{at}"


class BadMagic(FormatError):
    """The file does not start like any format fixedram knows."""


class UnsupportedVersion(FormatError):
    """A version field has a value this reader was not built for."""


class TruncatedFile(FormatError):
    """The input ends in the middle of a structure."""


class CorruptFile(FormatError):
    """A field holds a value that cannot be valid (length, offset, flag...)."""


class UnsupportedFeature(FormatError):
    """Valid QEMU data that fixedram deliberately does not decode.

    Kept apart from corruption so that users know the file is fine and the
    tool is the limit (for example XBZRLE pages or a big-endian bitmap).
    """


class CapabilityError(FixedramError):
    """A migration capability or parameter rule was violated.

    The message uses QEMU's own wording where QEMU has one, because users
    search for those strings.
    """


class TransportError(FixedramError):
    """A migration transport (URI, socket, pipe, file) failed."""

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        self.exc = exc
        super().__init__(message)


class MigrationError(FixedramError):
    """A migration failed, was cancelled, or was driven in a wrong state."""

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        self.exc = exc
        super().__init__(message)


class OutputError(FixedramError):
    """An output file could not be written safely (exists, no space...)."""

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        self.exc = exc
        super().__init__(message)
