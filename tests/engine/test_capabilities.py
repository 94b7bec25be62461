"""Every capability/parameter rule, with QEMU's message, at the moment QEMU checks it."""

from __future__ import annotations

import pytest
from engine_helpers import MIB, config

from fixedram.engine.capabilities import MigrationConfig, capability_mismatch
from fixedram.engine.incoming import load_file
from fixedram.engine.precopy import Migration
from fixedram.errors import CapabilityError


def caps(**on: bool) -> dict[str, bool]:
    return {k.replace("_", "-"): v for k, v in on.items()}


@pytest.mark.parametrize(("names", "message"), [
    (("mapped-ram", "xbzrle"), "Mapped-ram migration is incompatible with xbzrle"),
    (("fixed-ram", "xbzrle"), "Mapped-ram migration is incompatible with xbzrle"),
    (("mapped-ram", "postcopy-ram"), "Mapped-ram migration is incompatible with postcopy"),
    (("multifd", "xbzrle"), "Multifd is not compatible with xbzrle"),
    (("postcopy-ram", "multifd"), "Postcopy is not yet compatible with multifd"),
])
def test_incompatible_capabilities(names: tuple[str, str], message: str) -> None:
    cfg = MigrationConfig()
    with pytest.raises(CapabilityError) as ei:
        cfg.set_capabilities(dict.fromkeys(names, True))
    assert str(ei.value) == message
    assert not any(cfg.caps.values()), "a refused change must not be applied"


def test_fixed_ram_alias_and_query() -> None:
    """QEMU 10.0's 22 capabilities in its order; "fixed-ram" is an alias of the
    Python API only (QMP takes QEMU's names: see test_qmp_table.py)."""
    cfg = MigrationConfig()
    cfg.set_capabilities([{"capability": "fixed-ram", "state": True},
                          {"capability": "multifd", "state": True},
                          {"capability": "events", "state": True}])
    q = cfg.query_capabilities()
    assert len(q) == 22 and q[0]["capability"] == "xbzrle"
    assert q[-1]["capability"] == "mapped-ram"
    assert {c["capability"] for c in q if c["state"]} == {"mapped-ram", "multifd", "events"}
    with pytest.raises(CapabilityError, match="does not accept value 'bogus'"):
        cfg.set_capabilities({"bogus": True})


def test_capabilities_cannot_change_during_migration() -> None:
    with pytest.raises(CapabilityError, match=r"^There's a migration process in progress$"):
        MigrationConfig().set_capabilities({"multifd": True}, migration_running=True)
    with pytest.raises(CapabilityError, match=r"^Multifd must be set before incoming starts$"):
        MigrationConfig().set_capabilities({"multifd": True}, incoming_started=True)


def test_parameters() -> None:
    cfg = MigrationConfig()
    p = cfg.query_parameters()
    assert p["multifd-channels"] == 2 and p["downtime-limit"] == 300
    assert p["max-bandwidth"] == 128 * MIB and p["zero-page-detection"] == "multifd"
    with pytest.raises(CapabilityError, match=r"^Parameter 'multifd_channels' expects a value "
                       r"between 1 and 255$"):
        cfg.set_parameters({"multifd-channels": 0})
    with pytest.raises(CapabilityError, match=r"^Parameter 'multifd-channels' expects uint8_t$"):
        cfg.set_parameters({"multifd-channels": 256})
    with pytest.raises(CapabilityError, match="does not accept value 'lz4'"):
        cfg.set_parameters({"multifd-compression": "lz4"})
    with pytest.raises(CapabilityError, match="expected: boolean"):
        cfg.set_parameters({"direct-io": 1})
    cfg.set_parameters({"max-bandwidth": 1 << 30, "downtime-limit": 50,
                        "zero-page-detection": "none", "multifd-channels": 8})
    assert cfg.params["multifd-channels"] == 8


def test_compression_with_mapped_ram() -> None:
    """QEMU 10.0.2 checks the mapped-ram rule against the values already set:
    compression is accepted once, then every later change is refused until
    mapped-ram is off; migrate refuses the combination."""
    cfg = config(mapped=True, channels=2)
    cfg.set_parameters({"multifd-compression": "zlib"})
    for later in ({"multifd-compression": "none"}, {"multifd-channels": 4}):
        with pytest.raises(CapabilityError, match=r"^Mapped-ram only available for "
                           r"non-compressed non-TLS multifd migration$"):
            cfg.set_parameters(later)
    assert cfg.params["multifd-compression"] == "zlib" and cfg.params["multifd-channels"] == 2
    with pytest.raises(CapabilityError, match=r"^Cannot use compression with mapped-ram$"):
        cfg.check_migrate()
    cfg.set_capabilities({"mapped-ram": False})
    cfg.set_parameters({"multifd-compression": "none"})
    # Set the other way round, the migrate command refuses it too.
    cfg = config(multifd_compression="zstd")
    cfg.set_capabilities({"mapped-ram": True})
    with pytest.raises(CapabilityError, match=r"^Cannot use compression with mapped-ram$"):
        cfg.check_migrate()


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:1", "unix:/nonexistent/sock", "exec:cat",
                                 "fd:0"])
def test_mapped_ram_requires_seekable_transport(make_guest, uri: str) -> None:
    g = make_guest(ram=4 * MIB)
    with pytest.raises(CapabilityError, match=r"^Migration requires seekable transport "
                       r"\(e\.g\. file\)$"):
        Migration(g, config(mapped=True), uri)


@pytest.mark.parametrize("uri", ["file:/tmp/x", "exec:cat", "fd:0"])
def test_multifd_on_file_needs_mapped_ram(make_guest, uri: str) -> None:
    g = make_guest(ram=4 * MIB)
    cfg = MigrationConfig()
    cfg.set_capabilities({"multifd": True})
    with pytest.raises(CapabilityError, match=r"^Migration requires multi-channel URIs "
                       r"\(e\.g\. tcp\)$"):
        Migration(g, cfg, uri)


def test_direct_io_rules(make_guest, tmp_path) -> None:
    # Without mapped-ram + multifd it is accepted and has no effect (QEMU).
    assert not config(direct_io=True).direct_io
    assert not config(mapped=True, direct_io=True).direct_io
    assert config(mapped=True, channels=2, direct_io=True).direct_io
    # The seekable check fires first for sockets, as in QEMU.
    cfg = config(mapped=True, channels=2, direct_io=True)
    with pytest.raises(CapabilityError, match="seekable transport"):
        cfg.check_transport("tcp", False)


def test_direct_io_probe_refuses_bad_place(tmp_path) -> None:
    from fixedram.engine.sinks import probe_direct_io

    probe_direct_io(str(tmp_path))  # the test disk accepts O_DIRECT
    with pytest.raises(CapabilityError, match="does not accept O_DIRECT"):
        probe_direct_io(str(tmp_path / "missing"))


def test_destination_capability_mismatch(make_guest, tmp_path) -> None:
    g = make_guest(ram=4 * MIB)
    g.stop()
    mapped = tmp_path / "m.mig"
    stream = tmp_path / "s.mig"
    Migration(g, config(mapped=True, channels=2), f"file:{mapped}").run()
    Migration(g, config(), f"file:{stream}").run()
    dst = make_guest(ram=4 * MIB, fill=0)
    with pytest.raises(CapabilityError) as ei:
        load_file(str(mapped), dst, config())
    assert str(ei.value) == "Capability mapped-ram is off, but received capability is on"
    with pytest.raises(CapabilityError) as ei:
        load_file(str(stream), dst, config(mapped=True))
    assert str(ei.value) == "Capability mapped-ram is on, but received capability is off"
    with pytest.raises(CapabilityError, match="x-ignore-shared is off, but received capability "
                       "is on"):
        capability_mismatch({"mapped-ram": False}, ["x-ignore-shared"])
    load_file(str(mapped), dst, config(mapped=True, channels=3))
    assert dst.digest() == g.digest()
