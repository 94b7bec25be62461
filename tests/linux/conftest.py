"""Fixtures of the real-Linux-guest tests: one set of saves of a booted Debian kernel per session.

``linux_saves`` is a ``qemu_harness.LinuxArtifacts`` with ``dir``, ``paused_stream``,
``paused_mapped``, ``live_stream``, ``live_mapped``, ``qemu_dump``, ``pmem``, ``serial``,
``meta_path`` (Paths), ``info_registers`` (str), ``machine``, ``ram_size``, ``kernel_release``,
``meta`` (dict) and ``compare_ranges``. All paused artifacts are of one paused VM state (see
tests/qemu_harness/linux.py). Set FIXEDRAM_LINUX_ARTIFACTS=DIR to reuse a directory that
``python tests/qemu_harness/linux.py --out DIR`` completed, instead of booting (development only).
"""

from __future__ import annotations

# ``linux_saves`` itself is in tests/conftest.py: the bridge's postcopy tests use it too.
