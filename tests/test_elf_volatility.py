"""The ELF core from `extract --format elf` opens in volatility3's ELF layer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from volatility3.framework import contexts
from volatility3.framework.layers import elf, physical

from fixedram.format.machine import MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.writer import BlockSpec, MappedRamWriter
from fixedram.memory.extract import extract_elf

PS = 4096


def test_volatility3_reads_our_elf_core(tmp_path: Path) -> None:
    src = tmp_path / "vm.mig"
    rng = np.random.default_rng(7)
    pages = rng.integers(1, 255, size=(64, PS), dtype=np.uint8)
    fd = os.open(src, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w = MappedRamWriter(fd, MachineState("pc-q35-10.0", ("mapped-ram",)),
                            [BlockSpec("pc.ram", 32 << 20)])
        w.write_pages(0, 300, pages)
        w.finish()
    finally:
        os.close(fd)
    core = tmp_path / "core.elf"
    with MigrationFile(src) as mf:
        extract_elf(mf, core)
    ctx = contexts.Context()
    ctx.config["base.location"] = core.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["mem.base_layer"] = "base"
    layer = elf.Elf64Layer(ctx, "mem", "mem")
    assert layer.maximum_address == (32 << 20) - 1
    got = layer.read(300 * PS, 64 * PS)
    assert got == pages.tobytes()
    assert layer.read(0, PS, pad=True) == bytes(PS)
