"""Helpers for the engine tests (imported by name: tests/engine is on sys.path)."""

from __future__ import annotations

from typing import Any

from fixedram.engine.capabilities import MigrationConfig

MIB = 1 << 20


def config(mapped: bool = False, channels: int = 0, **params: Any) -> MigrationConfig:
    cfg = MigrationConfig()
    if mapped:
        cfg.set_capabilities({"mapped-ram": True, "multifd": channels > 0})
        if channels:
            cfg.set_parameters({"multifd-channels": channels})
    if params:
        cfg.set_parameters({k.replace("_", "-"): v for k, v in params.items()})
    return cfg
