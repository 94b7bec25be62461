"""Exit statuses: one scheme for every command, after qemu-img's.

``qemu-img check`` exits 0 when the image is fine, 1 when it could not be
checked and 2 when it found problems; ``qemu-img compare`` exits 0 when the
images are the same, 1 when they differ and 2 on an error. fixedram follows
both, so that "could not read the input" never shares a status with "the save
is incomplete", "unsound" or "differs" in one command:

=====  ==================================================  ==========================
 code   every command (``verify FILE`` as ``qemu-img check``)  ``verify --against`` (compare)
=====  ==================================================  ==========================
 0      done; ``verify``: sound                              RAM equal
 1      could not: an input unreadable, bad options, an      RAM differs
        output refused, a transport or migration failed,
        data fixedram does not support
 2      the save is malformed or incomplete (``inspect``     could not compare (as status 1
        describes it all the same; ``verify``: problems       of the other commands)
        found)
 3      (not used)                                           an input is malformed or
                                                             incomplete: nothing compared
                                                             is trusted
128+N   stopped by signal N (SIGINT, SIGTERM, SIGHUP)         the same
=====  ==================================================  ==========================
"""

from __future__ import annotations

from ..errors import FormatError, IncompleteSave, UnsupportedFeature

__all__ = [
    "COMPARE_DIFFER",
    "COMPARE_ERROR",
    "COMPARE_UNSOUND",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_STATUS_HELP",
    "EXIT_UNSOUND",
    "failure_status",
    "is_unsound",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNSOUND = 2
COMPARE_DIFFER = 1
COMPARE_ERROR = 2
COMPARE_UNSOUND = 3

#: The lines every command's ``--help`` ends with.
EXIT_STATUS_HELP = """\
exit status: 0 done, 1 could not (an input unreadable, bad options, an output refused, a
  transport failed), 2 the save is malformed or incomplete, 128+N stopped by signal N
"""


def is_unsound(e: BaseException) -> bool:
    """The error says the save itself is malformed or incomplete (not that it
    could not be read, nor that fixedram does not support what it holds)."""
    return isinstance(e, IncompleteSave) or (
        isinstance(e, FormatError) and not isinstance(e, UnsupportedFeature))


def failure_status(e: BaseException, *, comparing: bool = False) -> int:
    """The exit status of a command that ended with ``e``."""
    if comparing:
        return COMPARE_UNSOUND if is_unsound(e) else COMPARE_ERROR
    return EXIT_UNSOUND if is_unsound(e) else EXIT_FAILED
