"""``fixedram receive`` behind real QEMU 10 with multifd and ``multifd-compression`` zlib/zstd.

The live tests throttle a re-dirtying guest so several passes happen, migrate
it into ``fixedram receive`` over tcp and unix with 2 and 4 channels, and load
the file in a fresh QEMU 10 with mapped-ram on: RAM equals the source's
pmemsave and the guest runs on. The bad-input tests put a proxy between QEMU
and the receiver that rewrites one packet of a channel (its page data, its
compression flag): the receiver stops with one line naming the channel and
the packet, and leaves nothing under the output name.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bridge_helpers import (
    FIXEDRAM,
    MIB,
    LiveResult,
    Receiver,
    assert_bounded,
    assert_ram_equal,
    guest_continues,
)

from fixedram.errors import CorruptFile, UnsupportedFeature
from fixedram.format.multifd import (
    COMPRESSION_FLAGS,
    INIT_SIZE,
    MULTIFD_MAGIC_BYTES,
    PageCompressor,
    PageDecompressor,
    decode_packet,
    encode_packet,
    packet_size,
)
from qemu_harness import QemuVM, ram_split

RAM = 128 * MIB
PS = 4096


def _pages(n: int, seed: int) -> bytes:
    """Guest-like pages: some zero runs, some text-like, some random."""
    rng = np.random.default_rng(seed)
    a = np.zeros((n, PS), dtype=np.uint8)
    a[::3] = rng.integers(0, 256, size=(len(a[::3]), PS), dtype=np.uint8)
    a[1::3, :512] = np.frombuffer((b"fixedram " * 57)[:512], dtype=np.uint8)
    return a.tobytes()


# -- the codec, no QEMU ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_codec_stream_spans_packets(method: str) -> None:
    enc = PageCompressor(method, level=3)
    dec = PageDecompressor(method)
    out = memoryview(bytearray(128 * PS))
    payloads = []
    for k in range(6):
        pages = _pages(1 + 25 * k, k)
        z = enc.compress(pages)
        payloads.append((z, pages))
        assert bytes(dec.decompress(z, len(pages) // PS, out)) == pages
    # A later packet alone does not decode: the decoder's state is the channel's.
    fresh = PageDecompressor(method)
    z, pages = payloads[3]
    with pytest.raises(CorruptFile):
        fresh.decompress(z, len(pages) // PS, out, name="ch", offset=77)


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_codec_bounds_output(method: str) -> None:
    """Data that decode to more (a bomb) or fewer bytes than the packet's pages."""
    out = memoryview(bytearray(128 * PS))
    big = PageCompressor(method).compress(bytes(64 << 20))  # 64 MiB of zeros: a few KiB
    assert len(big) < 1 << 20
    with pytest.raises(CorruptFile, match=r"more than 524288 bytes.* 128 pages") as ei:
        PageDecompressor(method).decompress(big, 128, out, name="multifd channel 1",
                                            offset=4096)
    assert ei.value.offset == 4096 and "multifd channel 1" in str(ei.value)
    short = PageCompressor(method).compress(bytes(3 * PS))
    with pytest.raises(CorruptFile, match=r"to 12288 bytes, the packet has 4 pages"):
        PageDecompressor(method).decompress(short, 4, out)
    with pytest.raises(CorruptFile, match="corrupt"):
        PageDecompressor(method).decompress(b"\xff" * 100, 1, out)


def test_codec_zstd_window() -> None:
    """Every QEMU level (up to 20) decodes; a larger window than level 20's is refused."""
    import zstandard

    out = memoryview(bytearray(128 * PS))
    pages = _pages(8, 1)
    z = PageCompressor("zstd", level=20).compress(pages)
    assert bytes(PageDecompressor("zstd").decompress(z, 8, out)) == pages
    big = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters
                                   .from_level(1, window_log=27)).compressobj()
    z = big.compress(pages) + big.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    with pytest.raises(CorruptFile, match=r"zstd page data corrupt .*memory"):
        PageDecompressor("zstd").decompress(z, 8, out)


def test_codec_flags() -> None:
    empty = np.zeros(0, dtype=np.int64)
    normal = np.arange(4, dtype=np.int64)
    for method in ("zlib", "zstd"):
        raw = encode_packet(COMPRESSION_FLAGS[method], 9, "pc.ram", normal, empty,
                            payload_size=1000)
        p = decode_packet(raw)
        assert p.compression == method and p.next_packet_size == 1000
        # Compressed data may be at most QEMU's buffer (twice a packet), none without pages.
        with pytest.raises(CorruptFile, match="payload"):
            decode_packet(encode_packet(COMPRESSION_FLAGS[method], 9, "pc.ram", normal, empty,
                                        payload_size=(1 << 20) + 1))
        with pytest.raises(CorruptFile, match="payload"):
            decode_packet(encode_packet(COMPRESSION_FLAGS[method], 9, "pc.ram", empty,
                                        normal, payload_size=10))
    for method in ("qpl", "uadk", "qatzip"):
        raw = encode_packet(COMPRESSION_FLAGS[method], 9, "pc.ram", normal, empty,
                            payload_size=1000)
        with pytest.raises(UnsupportedFeature, match=f"multifd compression {method} is not"):
            decode_packet(raw, name="multifd channel 0", offset=64)
    with pytest.raises(CorruptFile, match="more than one compression method"):
        decode_packet(encode_packet(0x6, 9, "pc.ram", normal, empty, payload_size=100))


# -- real QEMU 10 ----------------------------------------------------------------------------


def _migrate_compressed(vm: QemuVM, uri: str, params: dict[str, Any], *, min_syncs: int = 4,
                        timeout: float = 90) -> LiveResult:
    """Live migration throttled until ``min_syncs`` passes, then let converge.

    The cap counts compressed bytes (a pass is a few MiB), so it is low. QEMU
    estimates the downtime from compressed bytes per second against
    uncompressed bytes left, so the last step allows any downtime: a loaded
    machine compressing slower than the guest dirties still converges.
    """
    vm.wait_for_progress(2, timeout=30)
    vm.set_caps(multifd=True)
    vm.set_params(max_bandwidth=4 * MIB, downtime_limit=1, **params)
    vm.qmp("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    while True:
        info = vm.query_migrate()
        if info.get("status") in ("failed", "cancelled", "completed"):
            raise AssertionError(f"migration ended early: {info}\n{vm.log_text()}")
        if info.get("ram", {}).get("dirty-sync-count", 0) >= min_syncs:
            break
        assert time.monotonic() < deadline, f"too slow: {info}"
        time.sleep(0.05)
    vm.set_params(max_bandwidth=1 << 30, downtime_limit=2_000_000)
    stats = vm.wait_migration(timeout)
    pmem = vm.pmemsave(0, ram_split(vm.ram_size, vm.machine)[0],
                       vm.workdir / f"{vm.name}.pmem")
    return LiveResult(stats, pmem, vm.machine_name())


def _uri(transport: str, tmp_path: Path) -> str:
    return "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path / 'rx.sock'}"


@pytest.mark.qemu
@pytest.mark.parametrize(("method", "channels", "transport", "level"), [
    ("zstd", 2, "tcp", None),
    ("zstd", 4, "unix", 9),
    ("zlib", 2, "unix", None),
    ("zlib", 4, "tcp", 6),
])
def test_receive_compressed_live(method: str, channels: int, transport: str,
                                 level: int | None, tmp_path: Path,
                                 vm_factory: Callable[..., Any],
                                 loaded_vm: Callable[..., Any],
                                 guest_image_factory: Callable[..., Path]) -> None:
    out = tmp_path / "mfd.mig"
    rx = Receiver(_uri(transport, tmp_path), out)
    params: dict[str, Any] = {"multifd-channels": channels, "multifd-compression": method}
    if level is not None:
        params[f"multifd-{method}-level"] = level
    try:
        # Pages with 64 written dwords: real work for the compressor, still compressible.
        src = vm_factory("q35", image=guest_image_factory(fill_words=64))
        res = _migrate_compressed(src, rx.address, params)
        rc, doc, err = rx.wait()
    finally:
        rx.kill()
    assert rc == 0, err
    assert doc is not None
    assert doc["multifd_compression"] == method
    assert doc["multifd_channels"] == channels and doc["multifd_packets"] > 0
    assert all(b > 0 for b in doc["channel_bytes"]), doc["channel_bytes"]
    # Several passes, pages rewritten in place, and the data really came compressed.
    assert doc["passes"] >= 3 and doc["pages_rewritten"] > 0, doc
    assert doc["bytes_received"] * 2 < doc["page_records"] * PS, doc
    assert_bounded(out, RAM)
    dst = loaded_vm(out, res.machine, {"mapped-ram": True})
    assert_ram_equal(dst, res.pmem, RAM, res.machine)
    guest_continues(dst)


# -- a proxy that rewrites one packet of a real QEMU channel ----------------------------------


Mutate = Callable[[bytearray, bytearray], None]  # (packet header block, payload), in place


class _Proxy:
    """Forwards QEMU's connections to the receiver; the ``nth`` packet with
    page data (over all channels) is handed to ``mutate`` first."""

    def __init__(self, listen: Path, target: str, nth: int, mutate: Mutate) -> None:
        self.target = target
        self.nth = nth
        self.mutate = mutate
        self.lock = threading.Lock()
        self.seen = 0
        self.hit: tuple[int, int] | None = None  # (channel id, packet number)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(listen))
        self.sock.listen(16)
        self.address = f"unix:{listen}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _connect(self) -> socket.socket:
        kind, rest = self.target.split(":", 1)
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.connect(rest)
            return s
        host, port = rest.rsplit(":", 1)
        return socket.create_connection((host, int(port)))

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            d = self._connect()
            self.conns += [c, d]
            threading.Thread(target=self._forward, args=(c, d), daemon=True).start()
            threading.Thread(target=self._pipe, args=(d, c), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    @staticmethod
    def _exact(s: socket.socket, n: int) -> bytearray | None:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = s.recv_into(view[got:])
            if k == 0:
                return None
            got += k
        return buf

    def _forward(self, c: socket.socket, d: socket.socket) -> None:
        head = c.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL)
        if head != MULTIFD_MAGIC_BYTES:
            self._pipe(c, d)
            return
        with contextlib.suppress(OSError):
            init = self._exact(c, INIT_SIZE)
            assert init is not None
            d.sendall(init)
            cid = init[24]
            while (hdr := self._exact(c, packet_size(PS))) is not None:
                p = decode_packet(hdr)  # QEMU's own packets: the same codec reads them
                payload = self._exact(c, p.next_packet_size) or bytearray()
                if p.normal_pages:
                    with self.lock:
                        self.seen += 1
                        if self.seen == self.nth:
                            self.mutate(hdr, payload)
                            self.hit = (cid, p.packet_num)
                d.sendall(hdr + payload)
        with contextlib.suppress(OSError):
            d.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.close()


def _garbage(hdr: bytearray, payload: bytearray) -> None:
    # 0xff starts an invalid block in both formats (deflate type 3, zstd reserved type).
    payload[:] = b"\xff" * len(payload)


def _flags(method: str) -> Mutate:
    def set_flag(hdr: bytearray, payload: bytearray) -> None:
        hdr[8:12] = COMPRESSION_FLAGS[method].to_bytes(4, "big")

    return set_flag


@pytest.mark.qemu
@pytest.mark.parametrize(("method", "mutate", "expect"), [
    ("zstd", _garbage, r"zstd page data corrupt"),
    ("zlib", _garbage, r"zlib page data corrupt"),
    ("zstd", _flags("zlib"), r"has multifd-compression zlib, earlier packets zstd"),
    ("zlib", _flags("qatzip"), r"multifd compression qatzip is not supported"),
    ("zstd", _flags("qpl"), r"multifd compression qpl is not supported"),
])
def test_receive_compressed_bad_packet(method: str, mutate: Mutate, expect: str,
                                       tmp_path: Path,
                                       vm_factory: Callable[..., Any]) -> None:
    out = tmp_path / "bad.mig"
    rx = Receiver(_uri("unix", tmp_path), out)
    proxy = _Proxy(tmp_path / "proxy.sock", rx.address, nth=7, mutate=mutate)
    try:
        src = vm_factory("pc", memory="64M")
        src.wait_for_progress(2, timeout=30)
        src.stop()
        src.set_caps(multifd=True)
        src.set_params(**{"multifd-channels": 2, "multifd-compression": method})
        src.qmp("migrate", uri=proxy.address)
        # (QEMU's side may even complete: nothing is acknowledged on a socket.)
        rc, doc, err = rx.wait(timeout=60)
    finally:
        rx.kill()
        proxy.close()
    assert rc != 0 and doc is None
    assert proxy.hit is not None
    cid, num = proxy.hit
    # A channel QEMU connects after the failure is closed with a notice of its own.
    lines = [ln for ln in err.strip().splitlines() if "closed a connection" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err  # one line
    assert f"multifd channel {cid}" in lines[0] and f"packet {num}" in lines[0], lines[0]
    assert re.search(expect, lines[0]), lines[0]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in left if "bad.mig" in n], left  # no output, no .partial


# -- fixedram send with compression: into QEMU 10, and into fixedram receive -----------------


@pytest.mark.qemu
@pytest.mark.parametrize("method", ["zstd", "zlib"])
def test_send_compressed(method: str, tmp_path: Path, saved_file: Callable[..., Any],
                         guest_image: Path, loaded_vm: Callable[..., Any]) -> None:
    """A live save sent compressed on 2 channels: a QEMU 10 destination with the
    same multifd-compression loads it byte-exact; so does ``fixedram receive``."""
    sf = saved_file(machine="pc", mode="mapped-ram", live=True)
    with QemuVM(tmp_path, guest_image, machine=sf.machine, memory=RAM, incoming=True,
                paused=True, name=f"dst-{method}") as dst:
        dst.set_caps(multifd=True)
        dst.set_params(**{"multifd-channels": 2, "multifd-compression": method})
        uri = f"unix:{tmp_path / 'dst.sock'}"
        dst.migrate_incoming(uri, wait=False)
        p = subprocess.run([*FIXEDRAM, "send", str(sf.path), uri, "--multifd-channels", "2",
                            "--multifd-compression", method, "--json"], capture_output=True,
                           check=False, timeout=120)
        assert p.returncode == 0, p.stderr.decode() + dst.log_text()
        doc = json.loads(p.stdout)
        assert doc["multifd_compression"] == method and doc["multifd_packets"] > 6
        assert doc["bytes_sent"] * 2 < RAM  # compressed (the guest's pages are mostly zero)
        dst.wait_migration(60)
        assert_ram_equal(dst, sf.pmem_path, RAM, sf.machine)
        guest_continues(dst)
    out = tmp_path / "back.mig"
    rx = Receiver(_uri("tcp", tmp_path), out)
    try:
        p = subprocess.run([*FIXEDRAM, "send", str(sf.path), rx.address, "--multifd-channels",
                            "3", "--multifd-compression", method], capture_output=True,
                           check=False, timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        rc, rdoc, err = rx.wait()
    finally:
        rx.kill()
    assert rc == 0 and rdoc is not None, err
    assert rdoc["multifd_compression"] == method and rdoc["multifd_channels"] == 3
    assert_bounded(out, RAM)
    back = loaded_vm(out, sf.machine, {"mapped-ram": True})
    assert_ram_equal(back, sf.pmem_path, RAM, sf.machine)
