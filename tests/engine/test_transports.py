"""URIs and every transport, end to end: save a guest over it, load it back."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from engine_helpers import MIB, config

from fixedram.engine.incoming import Incoming, load_file
from fixedram.engine.precopy import Migration
from fixedram.errors import TransportError
from fixedram.format.migfile import MigrationFile
from fixedram.transports.channels import open_incoming, open_outgoing
from fixedram.transports.uri import parse_uri


def test_parse_uris() -> None:
    u = parse_uri("file:/a/b,offset=4k")
    assert (u.kind, u.path, u.offset, u.seekable) == ("file", "/a/b", 4096, True)
    assert parse_uri("file:/a,offset=1M").offset == 1 << 20
    assert parse_uri("file:/a,offset=4096").offset == 4096
    assert parse_uri("file:/a,b").path == "/a,b"
    t = parse_uri("tcp:127.0.0.1:4444")
    assert (t.kind, t.host, t.port, t.seekable) == ("tcp", "127.0.0.1", 4444, False)
    assert parse_uri("tcp:[::1]:5").host == "::1"
    assert parse_uri("unix:/run/s").path == "/run/s"
    assert parse_uri("exec:cat > /x").command == "cat > /x"
    assert parse_uri("fd:7").fd == 7
    for k in ("unix:/s", "exec:cat", "fd:3", "tcp:h:1"):
        assert not parse_uri(k).seekable


@pytest.mark.parametrize(("uri", "message"), [
    ("file:/a,offset=0x20M", "file URI has bad offset 0x20M: Invalid argument"),
    ("file:/a,offset=junk", "file URI has bad offset junk: Invalid argument"),
    ("nbd:x", "unknown migration protocol: nbd:x"),
    ("tcp:nohost", "error parsing address 'nohost'"),
])
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(TransportError) as ei:
        parse_uri(uri)
    assert str(ei.value) == message


def test_channel_seekable_property(tmp_path) -> None:
    out = open_outgoing(f"file:{tmp_path / 'f'}")
    assert out.seekable
    out.abort()
    assert os.listdir(tmp_path) == []  # the temporary is gone
    assert not open_incoming("unix:/x").seekable
    assert open_incoming(f"file:{tmp_path}").seekable


def _roundtrip(make_guest, out_uri: str, in_uri: str, *, listen_first: bool) -> None:
    src = make_guest(ram=8 * MIB, rate=16 * MIB)
    dst = make_guest(ram=8 * MIB, fill=0)
    cfg = config(max_bandwidth=0)
    inc = None
    if listen_first:
        inc = Incoming(dst, cfg, in_uri).start()
    Migration(src, cfg, out_uri).run()
    if inc is None:
        inc = Incoming(dst, cfg, in_uri).start()
    assert inc.wait(30)
    assert inc.status == "completed", inc.error
    assert dst.digest() == src.digest()
    assert dst.seq == src.seq and dst.running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp(make_guest) -> None:
    port = _free_port()
    _roundtrip(make_guest, f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", listen_first=True)


def test_unix(make_guest, tmp_path) -> None:
    p = tmp_path / "mig.sock"
    _roundtrip(make_guest, f"unix:{p}", f"unix:{p}", listen_first=True)


def test_exec(make_guest, tmp_path) -> None:
    f = tmp_path / "via-exec.mig"
    _roundtrip(make_guest, f"exec:cat > {f}", f"exec:cat {f}", listen_first=False)
    assert MigrationFile(f).complete


def test_fd_pipe(make_guest) -> None:
    r, w = os.pipe()
    src = make_guest(ram=8 * MIB, rate=16 * MIB)
    dst = make_guest(ram=8 * MIB, fill=0)
    inc = Incoming(dst, config(), f"fd:{r}").start()
    Migration(src, config(max_bandwidth=0), f"fd:{w}").run()
    assert inc.wait(30) and inc.status == "completed", inc.error
    assert dst.digest() == src.digest()


def test_file_stream_and_offset(make_guest, tmp_path) -> None:
    g = make_guest(ram=8 * MIB, rate=16 * MIB)
    f = tmp_path / "off.mig"
    f.write_bytes(b"X" * 8192 + b"tail to be cut")
    for mapped in (False, True):
        cfg = config(mapped=mapped, channels=2 if mapped else 0, max_bandwidth=0)
        Migration(g, cfg, f"file:{f},offset=4k").run()
        data = f.read_bytes()
        assert data[:4096] == b"X" * 4096 and data[4096:4100] == b"QEVM"
        with MigrationFile(f, offset=4096) as mf:
            assert mf.complete and mf.format == ("mapped-ram" if mapped else "stream")
        dst = make_guest(ram=8 * MIB, fill=0)
        load_file(str(f), dst, cfg, offset=4096)
        assert dst.digest() == g.digest()
        g.cont()


def test_incoming_socket_refuses_mapped_ram_stream(make_guest) -> None:
    """A destination without mapped-ram over a pipe refuses a stream that has it."""
    src = make_guest(ram=4 * MIB)
    dst = make_guest(ram=4 * MIB, fill=0)
    r, w = os.pipe()
    inc = Incoming(dst, config(), f"fd:{r}").start()
    # Hand-feed a stream header with mapped-ram from another save.
    from fixedram.format.stream import encode_header

    def feed() -> None:
        os.write(w, encode_header("pc-fixedram-1.0", ["mapped-ram"]) + b"\x00" * 64)
        os.close(w)

    threading.Thread(target=feed).start()
    assert inc.wait(10)
    assert inc.status == "failed"
    assert inc.error == "Capability mapped-ram is off, but received capability is on"
    assert src.running
