"""Precopy under a workload, the two sinks, stats, cancel and failure."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from engine_helpers import MIB, config

from fixedram.engine.incoming import load_file
from fixedram.engine.precopy import Migration, dirty_runs
from fixedram.errors import FixedramError
from fixedram.format.migfile import MigrationFile
from util import assert_truthful_vmdesc


def test_dirty_runs() -> None:
    idx = np.array([0, 1, 2, 5, 6, 300, 301, *range(1000, 1600)])
    runs = list(dirty_runs(idx, 256))
    assert runs[:3] == [(0, 3), (5, 2), (300, 2)]
    assert runs[3:] == [(1000, 256), (1256, 256), (1512, 88)]


def test_live_save_grows_stream_not_fixed_ram(make_guest, tmp_path) -> None:
    """Re-dirtying 3x faster than max-bandwidth: the stream passes 2x RAM, fixed-ram
    stays within RAM + 1 MiB per block + device state; both restore exactly."""
    ram = 32 * MIB
    sizes = {}
    for mode in ("stream", "fixed-ram"):
        g = make_guest(ram=ram, rate=192 * MIB)
        time.sleep(0.1)
        cfg = config(mapped=mode == "fixed-ram", channels=4 if mode == "fixed-ram" else 0,
                     max_bandwidth=64 * MIB, x_max_passes=5,
                     direct_io=mode == "fixed-ram")
        path = tmp_path / f"{mode}.mig"
        m = Migration(g, cfg, f"file:{path}").run()
        q = m.query()
        assert q["status"] == "completed" and m.passes == 6, (mode, m.pass_bytes, q, g.status)
        assert q["ram"]["dirty-sync-count"] == 6 and q["downtime"] >= 0
        assert not g.running and g.status == "postmigrate"
        sizes[mode] = os.path.getsize(path)
        dst = make_guest(ram=ram, fill=0)
        load_file(str(path), dst, cfg)
        assert dst.digest() == g.digest(), mode
        assert dst.seq == g.seq
        # The engine describes its own device, decoded back to the saved values.
        assert_truthful_vmdesc(path)
        with MigrationFile(path) as mf:
            (dev,) = mf.devices()
            assert dev.fields["seq"] == g.seq and dev.fields["regs"] == g.regs
        if mode == "fixed-ram":
            with MigrationFile(path) as mf:
                tail = mf.size - (mf.blocks[-1].record.mapped.pages_offset
                                  + mf.blocks[-1].used_length)
                device = sum(d.data_length for d in mf.sections)
                assert device > 0
                nblocks = len(mf.blocks)
            total = sum(b.size for b in g.blocks)
            assert tail < 1024  # EOS, END, device section, EOF, vmdesc
            assert sizes[mode] <= total + nblocks * MIB + tail
    assert sizes["stream"] > 2 * ram


def test_paused_save_single_pass_zero_pages_are_holes(make_guest, tmp_path) -> None:
    g = make_guest(ram=16 * MIB, fill=0.25)
    g.stop()
    path = tmp_path / "p.mig"
    m = Migration(g, config(mapped=True, channels=2, max_bandwidth=0), f"file:{path}").run()
    q = m.query()
    assert m.passes == 2  # the bulk pass and the (empty) final pass
    ram = g.blocks[0]
    nonzero = ram.words.any(axis=1)
    with MigrationFile(path) as mf:
        b = mf.block("pc.ram")
        assert np.array_equal(b.bitmap, nonzero)
        assert q["ram"]["duplicate"] == int((~nonzero).sum())
        assert mf.allocated_bytes() < 0.5 * 16 * MIB
    for k in ("status", "total-time", "downtime", "setup-time"):
        assert k in q
    for k in ("transferred", "remaining", "duplicate", "normal", "dirty-sync-count", "mbps",
              "dirty-pages-rate"):
        assert k in q["ram"]


def test_zero_page_detection_none_writes_every_page(make_guest, tmp_path) -> None:
    g = make_guest(ram=4 * MIB, fill=0.5)
    g.stop()
    path = tmp_path / "z.mig"
    cfg = config(mapped=True, channels=2, zero_page_detection="none")
    Migration(g, cfg, f"file:{path}").run()
    with MigrationFile(path) as mf:
        assert mf.block("pc.ram").bitmap.all()


def test_page_rezeroed_keeps_stale_data_with_bit_clear(make_guest, tmp_path) -> None:
    g = make_guest(ram=4 * MIB, fill=1.0)
    g.stop()
    path = tmp_path / "r.mig"
    Migration(g, config(mapped=True, channels=2), f"file:{path}").run()
    g.blocks[0].pages[3] = 0
    g.cont()
    with g.log_lock:
        g.blocks[0].dirty[3] = True
    path2 = tmp_path / "r2.mig"
    Migration(g, config(mapped=True), f"file:{path2}").run()
    with MigrationFile(path2) as mf:
        assert not mf.block("pc.ram").bitmap[3]
    dst = make_guest(ram=4 * MIB, fill=0)
    load_file(str(path2), dst, config(mapped=True))
    assert dst.digest() == g.digest()


@pytest.mark.parametrize("mode", ["stream", "fixed-ram", "fixed-ram-offset"])
def test_cancel_mid_migration(make_guest, tmp_path, mode: str) -> None:
    g = make_guest(ram=32 * MIB, rate=64 * MIB)
    mapped = mode != "stream"
    path = tmp_path / "c.mig"
    uri = f"file:{path}"
    if mode == "fixed-ram-offset":
        path.write_bytes(b"H" * 4096)
        uri += ",offset=4096"
    events: list[str] = []
    cfg = config(mapped=mapped, channels=2 if mapped else 0, max_bandwidth=16 * MIB)
    m = Migration(g, cfg, uri, on_event=lambda n, d: events.append(d["status"])).start()
    deadline = time.monotonic() + 10
    while (m.sink is None or m.sink.transferred < 4 * MIB) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m.status == "active"
    m.cancel()
    assert m.wait(10)
    assert m.status == "cancelled" and events[-2:] == ["cancelling", "cancelled"]
    assert g.running and g.status == "running"
    seq = g.seq
    time.sleep(0.1)
    assert g.seq > seq, "the guest keeps running"
    if mode == "fixed-ram-offset":
        assert path.read_bytes() == b"H" * 4096  # cut back to the offset, prefix kept
    else:
        assert os.listdir(tmp_path) == []  # no file, no temporary
    assert m.query()["status"] == "cancelled"


def test_failure_resumes_guest_and_reports(make_guest, tmp_path) -> None:
    g = make_guest(ram=4 * MIB, rate=8 * MIB)
    m = Migration(g, config(), f"file:{tmp_path}/missing-dir/x.mig")
    with pytest.raises(Exception):  # noqa: B017 - OutputError from the file transport
        m.run()
    assert m.status == "failed" and m.query()["error-desc"]
    assert g.running


def test_running_state_machine_events(make_guest, tmp_path) -> None:
    g = make_guest(ram=8 * MIB, rate=32 * MIB)
    ev: list[tuple[str, dict]] = []
    cfg = config(mapped=True, channels=2, downtime_limit=2000)
    cfg.set_capabilities({"events": True})
    Migration(g, cfg, f"file:{tmp_path}/e.mig", on_event=lambda n, d: ev.append((n, d))).run()
    st = [d["status"] for n, d in ev if n == "MIGRATION"]
    assert st == ["setup", "active", "device", "completed"]
    assert any(n == "MIGRATION_PASS" for n, _ in ev)


def test_peer_going_away_fails_the_migration(make_guest) -> None:
    g = make_guest(ram=4 * MIB)
    m = Migration(g, config(), "exec:exit 3")
    with pytest.raises(FixedramError, match="exec:exit 3"):
        m.run()
    assert m.status == "failed"
