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
     │    ├── CorruptFile          a length, offset or value that cannot be right
     │    └── UnsupportedFeature   valid QEMU data that fixedram refuses to decode
     ├── InputError                an input cannot be opened or read (an OSError, with the path)
     ├── IncompleteSave            a save without its end, where a whole one is needed
     ├── UsageError                options that cannot work together, or a size that is no size
     │    └── SizeError            (fixedram.sizes) text that is not a size, or too large
     ├── CapabilityError           a capability/parameter rule of QEMU is violated
     ├── TransportError            a URI, socket, pipe or file transport failed
     ├── FdSetError                (fixedram.transports.fdsets) QEMU's refusal of an fd operation
     ├── QAPIError                 (fixedram.engine.qapi) a QMP command's error answer
     ├── MigrationError            a migration failed or was cancelled
     │    └── Cancelled            (fixedram.engine.precopy) migrate_cancel or the guest stopped
     └── OutputError               an output file cannot be written safely

Modules keep a few private subclasses for control flow inside one function;
they never escape it. ``tests/cli/test_errors.py`` checks that this tree is
the real one.
"""

from __future__ import annotations

import os

__all__ = [
    "BadMagic",
    "CapabilityError",
    "CorruptFile",
    "FixedramError",
    "FormatError",
    "IncompleteSave",
    "InputError",
    "MigrationError",
    "OutputError",
    "TransportError",
    "TruncatedFile",
    "UnsupportedFeature",
    "UnsupportedVersion",
    "UsageError",
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


class InputError(FixedramError, OSError):
    """An input (a save, a pipe, standard input) cannot be opened or read.

    Wraps the operating system's error and names the input once, so the
    command line prints ``PATH: reason`` and never a bare errno text. It is
    an :class:`OSError` too (``errno``, ``strerror``, ``filename``), so code
    written against the operating system's errors keeps working.

    :ivar path: the input as the user named it (``stdin`` for ``-``).
    :ivar offset: the input byte at which a read failed, if it was a read.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str | OSError,
                 *, offset: int | None = None) -> None:
        exc = reason if isinstance(reason, OSError) else None
        text = (exc.strerror or str(exc)) if exc is not None else str(reason)
        super().__init__(exc.errno if exc is not None else None, text, os.fspath(path))
        self.path = os.fspath(path)
        self.offset = offset
        if offset is None:
            self._message = f"{self.path}: {text}"
        else:
            self._message = f"{self.path}: reading at byte {offset} failed: {text}"

    def __str__(self) -> str:
        return self._message


class IncompleteSave(FixedramError):
    """A save that ends before its EOF marker (an unfinished or cut save),
    given to a command that needs a whole one."""


class UsageError(FixedramError):
    """Options or arguments that cannot work together (a raw extract to
    stdout, a pipe where a command needs random access, ...)."""


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
