"""Lazy restore (``restore --postcopy``, QMP mapped-ram + postcopy-ram at the
destination): the guest's RAM maps the file copy-on-write, runs at once, and
reads what the eager load reads."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_helpers import MIB
from test_qmp_guest import FIXEDRAM, guests  # noqa: F401  (the fixture)

from fixedram.engine.capabilities import MigrationConfig
from fixedram.engine.guest import BuiltinGuest, Workload, WorkloadSpec
from fixedram.engine.incoming import Incoming
from fixedram.engine.lazy import bitmap_runs, plan, set_runs, stale_runs
from fixedram.engine.precopy import Migration
from fixedram.errors import CapabilityError
from fixedram.format.libvirt import LibvirtHeader
from fixedram.format.migfile import MigrationFile

PAGE = 4096


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FIXEDRAM, *args], capture_output=True, text=True, timeout=timeout)


def save(uri: str, ram: str = "32M", fill: float = 0.5, *extra: str) -> dict[str, Any]:
    r = run("save", uri, "--ram", ram, "--fill", str(fill), "--workload", "none", "--json",
            *extra)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def restore(target: str, *extra: str) -> tuple[dict[str, Any], str]:
    r = run("restore", target, "--json", "--checksum", *extra)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout)), r.stderr


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def lazy_config() -> MigrationConfig:
    cfg = MigrationConfig()
    cfg.set_capabilities({"mapped-ram": True, "postcopy-ram": True}, inmigrate=True,
                         host_check=False)
    return cfg


def forge_stale(path: Path, offset: int = 0) -> int:
    """Junk under cleared bits of a real save (QEMU leaves such bytes): the
    first clear page after a set one, and a run of 8 clear pages elsewhere.
    Returns the first forged page."""
    with MigrationFile(path, offset=offset) as mf:
        b = mf.block("pc.ram")
        bits = b.bitmap.copy()
        base = b.record.mapped.pages_offset  # type: ignore[union-attr]
    clear = np.flatnonzero(~bits[1:] & bits[:-1]) + 1
    page = int(clear[0])
    runs = set_runs(~bits)
    long = runs[(runs[:, 1] - runs[:, 0]) >= 16]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xa5" * PAGE, base + page * PAGE)
        os.pwrite(fd, b"\x5a" * 8 * PAGE, base + int(long[-1, 0] + 4) * PAGE)
    finally:
        os.close(fd)
    return page


# -- the command line ---------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 12345])
def test_restore_postcopy_equals_eager_and_source(tmp_path: Path, offset: int) -> None:
    f = tmp_path / "s.mig"
    uri = f"file:{f}" + (f",offset={offset}" if offset else "")
    saved = save(uri, "32M", 0.5, "--mapped-ram")
    lazy, err = restore(uri, "--postcopy")
    eager, _ = restore(uri)
    assert err == ""
    assert lazy["lazy"] is True and eager["lazy"] is False
    assert lazy["ram_digest"] == eager["ram_digest"] == saved["ram_digest"]
    assert lazy["pages_loaded"] == eager["pages_loaded"] > 0
    for out in (lazy, eager):
        assert 0 < out["running_after_s"] <= out["complete_after_s"]
    assert eager["running_after_s"] == eager["complete_after_s"]
    assert "ram-digest" not in lazy


def test_restore_libvirt_sparse_image(tmp_path: Path) -> None:
    """A libvirt sparse image: QEMU data after libvirt's header, page regions at
    absolute offsets in the image."""
    head = LibvirtHeader.new(b"<domain type='kvm'><name>t</name></domain>",
                             format="sparse").encode()
    f = tmp_path / "guest.sav"
    saved = save(f"file:{f},offset={len(head)}", "32M", 0.3, "--mapped-ram")
    fd = os.open(f, os.O_WRONLY)
    os.pwrite(fd, head, 0)
    os.close(fd)
    with MigrationFile(f) as mf:
        assert mf.libvirt is not None and mf.libvirt.format == "sparse"
    lazy, _ = restore(str(f), "--postcopy")
    eager, _ = restore(str(f))
    assert lazy["lazy"] is True
    assert lazy["ram_digest"] == eager["ram_digest"] == saved["ram_digest"]


def test_cleared_bit_reads_zero_eager_and_lazy(tmp_path: Path) -> None:
    f = tmp_path / "s.mig"
    saved = save(f"file:{f}", "32M", 0.5, "--mapped-ram")
    forge_stale(f)
    before = sha256(f)
    lazy, _ = restore(str(f), "--postcopy")
    eager, _ = restore(str(f))
    assert lazy["lazy"] is True
    assert lazy["ram_digest"] == eager["ram_digest"] == saved["ram_digest"]
    assert sha256(f) == before


def test_cleared_bit_reads_zero_in_memory(tmp_path: Path) -> None:
    """The same through the API, page by page: the forged pages are zero in
    the guest, and the file still holds the junk."""
    f = tmp_path / "s.mig"
    save(f"file:{f}", "16M", 0.5, "--mapped-ram")
    page = forge_stale(f)
    g = BuiltinGuest(16 * MIB, fill=0)
    inc = Incoming(g, lazy_config(), f"file:{f}", autostart=False).run()
    assert inc.lazy is not None and inc.status == "completed"
    ram = g.blocks[0]
    assert ram.file_backed
    assert not ram.pages[page].any()
    assert sum(int(b.stale[:, 1].sum() - b.stale[:, 0].sum()) for b in inc.lazy.blocks) == 9
    with MigrationFile(f) as mf:
        assert mf.block("pc.ram").read(page * PAGE, PAGE) == bytes(PAGE)  # bit clear
        base = mf.block("pc.ram").record.mapped.pages_offset  # type: ignore[union-attr]
        assert os.pread(mf.fd, 4, base + page * PAGE) == b"\xa5" * 4
    g.shutdown()


def test_guest_writes_leave_the_file_unchanged(tmp_path: Path) -> None:
    f = tmp_path / "s.mig"
    saved = save(f"file:{f}", "32M", 0.5, "--mapped-ram")
    before = sha256(f)
    g = BuiltinGuest(32 * MIB, fill=0)
    g.stop()  # the vCPUs start when the load lets the guest run
    g.add_workload(Workload(g, WorkloadSpec(rate=512 * MIB, pattern="random", threads=2)))
    events: list[str] = []
    inc = Incoming(g, lazy_config(), f"file:{f}", autostart=True,
                   on_event=lambda n, d: events.append(d.get("status", n)))
    inc.run()
    assert events == ["setup", "active", "postcopy-active", "RESUME", "completed"]
    assert g.running
    time.sleep(0.5)
    g.stop()
    written = g._workloads[0].pages_written
    assert written > 0
    assert g.digest() != saved["ram_digest"]  # the guest did write
    g.shutdown()
    assert sha256(f) == before


def test_restore_16g_sparse_runs_at_once(tmp_path: Path) -> None:
    """Mapping is flat in RAM size: a 16 GiB save runs within 0.1 s (a bound
    on a flat operation, not a benchmark: bench/bench_restore.py measures)."""
    f = tmp_path / "big.mig"
    # Saved in-process: ``fixedram save`` would spend ~30 s on the digest of 16 GiB.
    g = BuiltinGuest(16 << 30, fill=0.02)  # ~330 MiB of data
    g.stop()
    cfg = MigrationConfig()
    cfg.set_capabilities({"mapped-ram": True, "multifd": True})
    cfg.set_parameters({"multifd-channels": 2, "max-bandwidth": 0})
    Migration(g, cfg, f"file:{f}").run()
    g.shutdown()
    del g
    assert os.stat(f).st_size > 16 << 30
    lazy, _ = restore(str(f), "--postcopy")
    out = json.loads(run("restore", str(f), "--postcopy", "--json").stdout)
    assert lazy["lazy"] is True and lazy["ram_bytes"] == 16 << 30
    assert min(lazy["running_after_s"], out["running_after_s"]) < 0.1
    assert lazy["complete_after_s"] >= lazy["running_after_s"]


def test_sequential_stream_says_why_and_loads(tmp_path: Path) -> None:
    f = tmp_path / "s.mig"
    saved = save(f"file:{f}", "16M", 0.5)
    out, err = restore(str(f), "--postcopy")
    assert out["lazy"] is False and out["ram_digest"] == saved["ram_digest"]
    lines = err.splitlines()
    assert len(lines) == 1 and "sequential stream" in lines[0] and "eagerly" in lines[0]
    assert out["note"] == lines[0].removeprefix("fixedram: ")


def test_region_past_end_is_refused_by_name(tmp_path: Path) -> None:
    f = tmp_path / "s.mig"
    save(f"file:{f}", "16M", 0.5, "--mapped-ram")
    with MigrationFile(f) as mf:
        base = mf.block("pc.ram").record.mapped.pages_offset  # type: ignore[union-attr]
    os.truncate(f, base + 4 * MIB)
    r = run("restore", str(f), "--postcopy")
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "'pc.ram'" in lines[0] and "past the end" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_postcopy_with_multifd_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "s.mig"
    save(f"file:{f}", "16M", 0.5, "--mapped-ram")
    r = run("restore", str(f), "--postcopy", "--multifd", "2")
    assert r.returncode != 0
    assert r.stderr == "fixedram: error: Postcopy is not yet compatible with multifd\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_fault_in(tmp_path: Path, sig: signal.Signals) -> None:
    """A signal while pages come in: the command exits as interrupted, at once
    (the fault-in thread stops), printing no result, and leaves the file as it
    was and nothing beside it."""
    f = tmp_path / "s.mig"
    save(f"file:{f}", "128M", 0.9, "--mapped-ram")
    before = sha256(f)
    # 115 MiB of pages at 32 MiB/s: the fault-in takes ~3.5 s.
    p = subprocess.Popen([FIXEDRAM, "restore", str(f), "--postcopy", "--json",
                          "--max-postcopy-bandwidth", "32M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    maps = f"/proc/{p.pid}/maps"
    while str(f) not in (Path(maps).read_text() if os.path.exists(maps) else ""):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    t = time.monotonic()
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t < 2.0, "the fault-in thread did not stop"
    assert p.returncode == 128 + sig, err
    assert out == "" and "Traceback" not in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["s.mig"]
    assert sha256(f) == before


# -- QMP ------------------------------------------------------------------------------


def test_qmp_fast_snapshot_load(guests: Any, tmp_path: Path) -> None:  # noqa: F811
    f = tmp_path / "s.mig"
    saved = save(f"file:{f}", "32M", 0.5, "--mapped-ram")
    src = guests("src", "--ram", "32M")
    with pytest.raises(Exception, match="Mapped-ram migration is incompatible with postcopy"):
        src("migrate-set-capabilities", capabilities=[
            {"capability": "mapped-ram", "state": True},
            {"capability": "postcopy-ram", "state": True}])
    dst = guests("dst", "--ram", "32M", "--incoming", "defer")
    dst("migrate-set-capabilities", capabilities=[
        {"capability": "mapped-ram", "state": True},
        {"capability": "postcopy-ram", "state": True},
        {"capability": "events", "state": True}])
    dst("migrate-incoming", uri=f"file:{f}")
    assert dst.wait_migration()["status"] == "completed"
    got = [(e["event"], e.get("data", {}).get("status")) for e in dst.drain_events()
           if e["event"] in ("MIGRATION", "RESUME")]
    assert got == [("MIGRATION", "setup"), ("MIGRATION", "active"),
                   ("MIGRATION", "postcopy-active"), ("RESUME", None),
                   ("MIGRATION", "completed")]
    assert dst("query-status") == {"status": "running", "running": True}
    assert dst("x-query-ram-digest")["digest"] == saved["ram_digest"]


# -- the pieces -----------------------------------------------------------------------


def test_capability_rule_destination_only() -> None:
    cfg = MigrationConfig()
    with pytest.raises(CapabilityError, match="incompatible with postcopy"):
        cfg.set_capabilities({"mapped-ram": True, "postcopy-ram": True})
    cfg.set_capabilities({"mapped-ram": True, "postcopy-ram": True}, inmigrate=True,
                         host_check=False)
    with pytest.raises(CapabilityError, match=r"^Mapped-ram migration is incompatible with "
                       r"postcopy$"):
        cfg.check_migrate()  # a destination that became a source
    with pytest.raises(CapabilityError, match="not yet compatible with multifd"):
        cfg.set_capabilities({"multifd": True}, inmigrate=True, host_check=False)


def test_unaligned_page_region_falls_back(tmp_path: Path) -> None:
    f = tmp_path / "s.mig"
    save(f"file:{f}", "16M", 0.5, "--mapped-ram")
    g = BuiltinGuest(16 * MIB, fill=0)
    with MigrationFile(f) as mf:
        base = mf.block("pc.ram").record.mapped.pages_offset  # type: ignore[union-attr]
        blocks, why = plan(mf, g, granularity=(base & -base) * 2)  # a host with bigger pages
        assert blocks == [] and why is not None and "not aligned" in why
        blocks, why = plan(mf, g)
        assert why is None and len(blocks) == 2
    g.shutdown()


def test_bitmap_runs_and_stale_runs_against_pages() -> None:
    rng = np.random.default_rng(5)
    for n in (1, 63, 64, 65, 129, 5000):
        for p in (0.0, 0.1, 0.5, 1.0):
            bits = rng.random(n) < p
            raw = np.packbits(np.concatenate([bits, rng.random(-n % 64) < 0.5]),
                              bitorder="little").tobytes()  # junk past the last page
            runs = bitmap_runs(raw, n)
            assert np.array_equal(runs, set_runs(bits)), (n, p)
            ext = np.sort(rng.integers(0, n * PAGE + 1, 6)).reshape(-1, 2) + 7 * PAGE
            want = np.zeros(n, dtype=bool)
            for a, b in (ext - 7 * PAGE).tolist():
                want[a // PAGE:-(-b // PAGE)] = True
            assert np.array_equal(stale_runs(runs, ext, 7 * PAGE, n), set_runs(want & ~bits))
