"""fixedram: QEMU's fixed-ram (mapped-ram) migration format, its stream, and tools.

The entry point for reading a save is :func:`open_save`; every error fixedram
raises is a :class:`FixedramError`.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BadMagic,
    CorruptFile,
    FixedramError,
    FormatError,
    IncompleteSave,
    InputError,
    OutputError,
    TruncatedFile,
    UnsupportedFeature,
    UsageError,
)

if TYPE_CHECKING:
    from .save import BlockFacts, Save, open_save, reads_one_pass

_LAZY = {"BlockFacts", "Save", "open_save", "reads_one_pass"}


def __getattr__(name: str) -> Any:
    # The readers import numpy: loaded when first asked for, so that
    # ``fixedram --version`` and the errors cost no more than themselves.
    if name in _LAZY:
        from . import save

        return getattr(save, name)
    raise AttributeError(f"module 'fixedram' has no attribute {name!r}")

__all__ = [
    "BadMagic",
    "BlockFacts",
    "CorruptFile",
    "FixedramError",
    "FormatError",
    "IncompleteSave",
    "InputError",
    "OutputError",
    "Save",
    "TruncatedFile",
    "UnsupportedFeature",
    "UsageError",
    "__version__",
    "open_save",
    "reads_one_pass",
]
