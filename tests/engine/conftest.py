"""Shared helpers for the engine tests: small built-in guests, saves and loads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from engine_helpers import MIB

from fixedram.engine.guest import BuiltinGuest, Workload, WorkloadSpec


@pytest.fixture
def make_guest() -> Iterator[Any]:
    guests: list[BuiltinGuest] = []

    def make(ram: int = 16 * MIB, fill: float = 0.5, rate: int = 0, seed: int = 1,
             pattern: str = "random") -> BuiltinGuest:
        g = BuiltinGuest(ram, fill=fill, seed=seed)
        if rate:
            g.add_workload(Workload(g, WorkloadSpec(rate=rate, pattern=pattern)))
        guests.append(g)
        return g

    yield make
    for g in guests:
        g.shutdown()
