"""Run one QMP sequence on ``fixedram guest`` and on a real QEMU 10, record the answers.

Both peers start stopped with the same RAM size: QEMU as
``qemu-system-x86_64 -machine q35 -nodefaults -m 64M -S`` and fixedram as
``fixedram guest --ram 64M -S`` (no workload), each with QMP on a unix
socket. A sequence is a list of steps (:class:`Q` commands, :class:`W`
waits, :class:`E` event checkpoints, :class:`O` descriptors to pass with
SCM_RIGHTS...); running it records one normalised value per recording step,
and the two records must be equal. Normalisation removes only what must
differ: timestamps, descriptor numbers, times and byte counts of a different
RAM layout, the version's package string (see :func:`normalise`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIXEDRAM = os.path.join(os.path.dirname(sys.executable), "fixedram")
RAM = "64M"


@dataclass
class Q:
    """Send a command; record its normalised answer.

    ``args`` may hold ``{d}`` (the side's own directory); ``fds`` names
    descriptors opened by :class:`O`, sent with the message.
    """

    cmd: str
    args: dict[str, Any] | None = None
    fds: tuple[str, ...] = ()
    record: bool = True


@dataclass
class W:
    """Wait until query-migrate reports a final (or the given) state."""

    states: tuple[str, ...] = ("completed", "failed", "cancelled")
    timeout: float = 30.0


@dataclass
class E:
    """Record the events received since the last checkpoint (wait ``settle`` first)."""

    settle: float = 0.3


@dataclass
class O:  # noqa: E742 - the step that Opens a descriptor
    """Open ``path`` (``{d}`` = the side's directory) with ``flags`` as descriptor ``name``."""

    name: str
    path: str
    flags: int


@dataclass
class S:
    seconds: float


@dataclass
class X:
    """Record whether the peer process has exited, and its status (after ``wait`` s)."""

    wait: float = 3.0


@dataclass
class Peer:
    name: str
    cmd: list[str]
    sock: str
    proc: subprocess.Popen[bytes] | None = None
    s: socket.socket | None = None
    buf: bytes = b""
    events: list[dict[str, Any]] = field(default_factory=list)
    fds: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def connect(self, timeout: float = 20) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (self.name, self.proc.stderr.read())  # type: ignore[union-attr]
            if os.path.exists(self.sock):
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.settimeout(30)
                    s.connect(self.sock)
                    break
                except OSError:
                    s.close()
            assert time.monotonic() < deadline, f"{self.name}: QMP socket did not appear"
            time.sleep(0.02)
        self.s = s
        greeting = self._read()
        assert "QMP" in greeting
        self.greeting = greeting
        assert self.ask({"execute": "qmp_capabilities"}) == {"return": {}}

    def _read(self) -> dict[str, Any]:
        assert self.s is not None
        while b"\n" not in self.buf:
            chunk = self.s.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"{self.name} closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, msg: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        assert self.s is not None
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            socket.send_fds(self.s, [data], fds)
        else:
            self.s.sendall(data)
        while True:
            doc = self._read()
            if "event" in doc:
                self.events.append(doc)
                continue
            return doc

    def drain(self, settle: float) -> list[dict[str, Any]]:
        """Events so far, after ``settle`` seconds of letting more arrive."""
        assert self.s is not None
        deadline = time.monotonic() + settle
        self.s.setblocking(False)
        try:
            while True:
                with contextlib.suppress(BlockingIOError):
                    chunk = self.s.recv(1 << 20)
                    if not chunk:
                        break
                    self.buf += chunk
                while b"\n" in self.buf:
                    line, self.buf = self.buf.split(b"\n", 1)
                    doc = json.loads(line)
                    assert "event" in doc, doc
                    self.events.append(doc)
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        finally:
            self.s.setblocking(True)
            self.s.settimeout(30)
        out, self.events = self.events, []
        return out

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.s is not None:
            self.s.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            assert self.proc.stderr is not None
            self.proc.stderr.close()


def peers(qemu: str, tmp: Path, *, incoming: bool = False) -> list[Peer]:
    """A QEMU and a fixedram peer, each with its own directory under ``tmp``."""
    out = []
    for name in ("qemu", "fixedram"):
        d = tmp / name
        d.mkdir(parents=True, exist_ok=True)
        sock = str(d / "qmp.sock")
        if name == "qemu":
            cmd = [qemu, "-machine", "q35", "-nodefaults", "-m", RAM, "-S", "-display", "none",
                   "-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off"]
            if incoming:
                cmd += ["-incoming", "defer"]
        else:
            cmd = [FIXEDRAM, "guest", "--qmp", sock, "--ram", RAM, "-S",
                   "--workload-rate", "0", "--fill", "0"]
            if incoming:
                cmd += ["--incoming", "defer"]
        out.append(Peer(name, cmd, sock))
    for p in out:
        p.start()
    for p in out:
        p.connect()
    return out


def _subst(v: Any, d: str) -> Any:
    if isinstance(v, str):
        return v.replace("{d}", d)
    if isinstance(v, list):
        return [_subst(x, d) for x in v]
    if isinstance(v, dict):
        return {k: _subst(x, d) for k, x in v.items()}
    return v


def run(peer: Peer, steps: list[Any]) -> list[Any]:
    """Run ``steps`` on one peer; the list of normalised records."""
    d = str(Path(peer.sock).parent)
    rec: list[Any] = []
    for st in steps:
        if isinstance(st, Q):
            msg: dict[str, Any] = {"execute": st.cmd}
            if st.args is not None:
                msg["arguments"] = _subst(st.args, d)
            fds = [peer.fds.pop(n) for n in st.fds]
            try:
                reply = peer.ask(msg, fds)
            finally:
                for fd in fds:  # the peer has its own copy now
                    os.close(fd)
            if st.record:
                # Each side has its own directory: paths in answers read {d}.
                reply = json.loads(json.dumps(reply).replace(d, "{d}"))
                rec.append((st.cmd, normalise(st.cmd, msg.get("arguments"), reply)))
        elif isinstance(st, W):
            deadline = time.monotonic() + st.timeout
            while True:
                q = peer.ask({"execute": "query-migrate"})["return"]
                if q.get("status") in st.states:
                    break
                assert time.monotonic() < deadline, (peer.name, q)
                time.sleep(0.05)
        elif isinstance(st, E):
            rec.append(("events", normalise_events(peer.drain(st.settle))))
        elif isinstance(st, O):
            peer.fds[st.name] = os.open(_subst(st.path, d), st.flags, 0o600)
        elif isinstance(st, S):
            time.sleep(st.seconds)
        elif isinstance(st, X):
            assert peer.proc is not None
            try:
                rc: int | None = peer.proc.wait(st.wait)
            except subprocess.TimeoutExpired:
                rc = None
            rec.append(("exit", rc))
        else:  # pragma: no cover - a typo in a table
            raise TypeError(st)
    return rec


# -- normalisation ------------------------------------------------------------------

# Members whose values depend on time or on the RAM layout (fixedram's guest
# has pc.ram and pc.bios; QEMU's q35 has option ROMs and ACPI tables too).
_MIGRATE_VOLATILE = {"total-time", "setup-time", "downtime", "expected-downtime"}
_RAM_VOLATILE = {"transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
                 "dirty-pages-rate", "mbps", "multifd-bytes", "pages-per-second",
                 "precopy-bytes", "downtime-bytes"}
_HMP_VOLATILE = re.compile(
    r"^(total time|expected downtime|downtime|setup|transferred ram|throughput|remaining ram|"
    r"total ram|duplicate|normal|normal bytes|multifd bytes|precopy ram|downtime ram|"
    r"dirty pages rate): .*$", re.MULTILINE)


def _kind(v: Any) -> str:
    assert isinstance(v, (int, float)) and not isinstance(v, bool), v
    return "<number>"


def normalise(cmd: str, args: Any, reply: dict[str, Any]) -> Any:
    reply = dict(reply)
    reply.pop("id", None)
    if "error" in reply:
        return reply
    r = reply["return"]
    if cmd == "query-migrate" and isinstance(r, dict):
        r = {k: _kind(v) if k in _MIGRATE_VOLATILE else v for k, v in r.items()}
        if "socket-address" in r:  # a port the kernel picked
            r["socket-address"] = [{**a, "port": "<port>"} if a.get("type") == "inet" else a
                                   for a in r["socket-address"]]
        if "ram" in r:
            r["ram"] = {k: _kind(v) if k in _RAM_VOLATILE else v for k, v in r["ram"].items()}
    elif cmd == "add-fd":
        r = {**r, "fd": "<fd>"}
    elif cmd == "query-fdsets":
        r = [{**s, "fds": [{**f, "fd": "<fd>"} for f in s["fds"]]} for s in r]
    elif cmd == "query-version":
        r = {**r, "package": "<package>"}
    elif cmd == "human-monitor-command":
        r = normalise_hmp(args["command-line"], r)
    return {"return": r}


def normalise_hmp(line: str, text: str) -> str:
    words = line.split()
    if words[:2] == ["info", "migrate"] and len(words) == 2:
        text = _HMP_VOLATILE.sub(lambda m: m.group(1) + ": <n>", text)
        # fixedram's streams carry no global-state section; it says so.
        text = re.sub(r"store-global-state: (on|off)", "store-global-state: <x>", text)
        text = re.sub(r"(\ttcp:[^\r]*):\d+\r", r"\1:<port>\r", text)
    elif words[:2] == ["info", "ramblock"]:
        lines = text.split("\r\n")
        keep = [lines[0]] + [x for x in lines[1:] if x.strip().startswith("pc.ram ")]
        text = "\r\n".join(re.sub(r"0x[0-9a-f]{16}( +r[ow])$", r"<hva>\1", x) for x in keep)
    elif words[:2] == ["info", "version"]:
        text = re.sub(r"^(\d+\.\d+\.\d+).*", r"\1<package>", text)
    return text


def normalise_events(events: list[dict[str, Any]]) -> list[Any]:
    """Names and data, without timestamps. The MIGRATION_PASS events while the
    migration is ``active`` (after the first) count how many passes it took,
    which depends on timing on QEMU as here: they are checked to be numbered
    consecutively and then left out; the first and the final pass stay."""
    out: list[Any] = []
    status = None
    passes = []
    for e in events:
        assert set(e) <= {"event", "data", "timestamp"}, e
        assert isinstance(e["timestamp"]["seconds"], int)
        name, data = e["event"], e.get("data")
        if name == "MIGRATION":
            status = data["status"]
        if name == "MIGRATION_PASS":
            passes.append(data["pass"])
            if status == "active" and data["pass"] > 1:
                continue
            data = {"pass": "first" if data["pass"] == 1 else "last"}
        out.append([name, data])
    assert passes == list(range(passes[0], passes[0] + len(passes))) if passes else True, \
        passes
    return out


# -- introspection ------------------------------------------------------------------

def resolve(schema: list[dict[str, Any]], name: str) -> Any:
    """A type of a query-qmp-schema answer as a tree without the masked names,
    so two schemas can be compared structure for structure."""
    by = {e["name"]: e for e in schema}

    def tree(t: str) -> Any:
        e = by[t]
        mt = e["meta-type"]
        if mt == "builtin":
            return ("builtin", e["json-type"])
        if mt == "array":
            return ("array", tree(e["element-type"]))
        if mt == "enum":
            return ("enum", tuple(e["values"]),
                    tuple((m["name"], tuple(m.get("features", ()))) for m in e["members"]))
        if mt == "alternate":
            return ("alternate", tuple(tree(m["type"]) for m in e["members"]))
        if mt == "object":
            return ("object",
                    tuple((m["name"], tree(m["type"]), "default" in m,
                           tuple(m.get("features", ()))) for m in e["members"]),
                    e.get("tag"),
                    tuple((v["case"], tree(v["type"])) for v in e.get("variants", ())))
        if mt == "command":
            return ("command", tree(e["arg-type"]), tree(e["ret-type"]),
                    bool(e.get("allow-oob")), tuple(e.get("features", ())))
        if mt == "event":
            return ("event", tree(e["arg-type"]), tuple(e.get("features", ())))
        raise AssertionError(mt)

    return tree(name)
