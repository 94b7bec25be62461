"""The migration QMP surface, sequence by sequence, against a real QEMU 10.

Every row of :data:`TABLE` is a QMP sequence run on ``fixedram guest`` and on
``qemu-system-x86_64 -machine q35 -nodefaults -m 64M -S`` (fresh processes
per row); the normalised answers (see :mod:`qmp_table_harness`) must be equal,
error class and message included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from qmp_table_harness import E, O, Q, S, W, X, peers, resolve, run

from fixedram.engine.capabilities import CAPABILITIES, PARAMETERS


def _caps(*pairs: tuple[str, Any]) -> Q:
    return Q("migrate-set-capabilities",
             {"capabilities": [{"capability": c, "state": s} for c, s in pairs]})


def _params(**kw: Any) -> Q:
    return Q("migrate-set-parameters", {k.replace("_", "-"): v for k, v in kw.items()})


def _p(name: str, value: Any) -> Q:
    return Q("migrate-set-parameters", {name: value})


def _hmp(line: str) -> Q:
    return Q("human-monitor-command", {"command-line": line})


EVENTS_ON = _caps(("events", True))
STATUS = Q("query-status")
MIGRATE_Q = Q("query-migrate")

# -- set-time checks ------------------------------------------------------------------

PARAMETER_CASES = [
    ("multifd-channels", v) for v in (256, 0, -1, 1000, 1.5, "2", None, 255, 1)
] + [
    ("downtime-limit", 2000001), ("downtime-limit", -1), ("downtime-limit", 2000000),
    ("max-bandwidth", -1), ("max-bandwidth", 18446744073709551615),
    ("max-bandwidth", 18446744073709551616), ("max-bandwidth", "1"), ("max-bandwidth", True),
    ("avail-switchover-bandwidth", -1), ("throttle-trigger-threshold", 0),
    ("throttle-trigger-threshold", 101), ("throttle-trigger-threshold", 300),
    ("cpu-throttle-initial", 0), ("cpu-throttle-initial", 100), ("cpu-throttle-increment", 0),
    ("cpu-throttle-increment", 100), ("max-cpu-throttle", 0), ("max-cpu-throttle", 100),
    ("max-cpu-throttle", 10), ("multifd-zlib-level", 10), ("multifd-zlib-level", 300),
    ("multifd-zstd-level", 21), ("multifd-qatzip-level", 0), ("multifd-qatzip-level", 10),
    ("xbzrle-cache-size", 1000), ("xbzrle-cache-size", 3000000), ("xbzrle-cache-size", 2048),
    ("xbzrle-cache-size", 4096), ("announce-initial", 100001), ("announce-max", 100001),
    ("announce-rounds", 1001), ("announce-rounds", -1), ("announce-step", 0),
    ("announce-step", 10001), ("announce-initial", 0), ("x-vcpu-dirty-limit-period", 0),
    ("x-vcpu-dirty-limit-period", 1001), ("x-vcpu-dirty-limit-period", -1),
    ("vcpu-dirty-limit", 0), ("vcpu-dirty-limit", -1), ("x-checkpoint-delay", -1),
    ("x-checkpoint-delay", 5000000000), ("max-postcopy-bandwidth", -5),
    ("mode", "cpr-reboot"), ("mode", "cpr-transfer"), ("mode", "bogus"), ("mode", 1),
    ("mode", None), ("mode", "normal"), ("zero-page-detection", "bogus"),
    ("zero-page-detection", "legacy"), ("multifd-compression", "lz4"),
    ("multifd-compression", "qpl"), ("multifd-compression", "uadk"),
    ("multifd-compression", "qatzip"), ("multifd-compression", "zstd"),
    ("multifd-compression", "zlib"), ("multifd-compression", "none"), ("tls-creds", ""),
    ("tls-creds", None), ("tls-creds", "tls0"), ("tls-creds", 5), ("tls-creds", []),
    ("tls-hostname", None), ("tls-authz", "x"), ("direct-io", True), ("direct-io", 1),
    ("direct-io", None), ("cpu-throttle-tailslow", 1), ("nope", 1), ("x-max-passes", 1),
    ("block-bitmap-mapping", []), ("block-bitmap-mapping", 5), ("block-bitmap-mapping", None),
    ("block-bitmap-mapping", [{"node-name": "x"}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "y", "bitmaps": []},
                              {"node-name": "x", "alias": "z", "bitmaps": []}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "y", "bitmaps": []},
                              {"node-name": "w", "alias": "y", "bitmaps": []}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "", "bitmaps": []}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "a b", "bitmaps": []}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "1a", "bitmaps": []}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "a" * 300, "bitmaps": []}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "a", "bitmaps": [
        {"name": "b", "alias": "c"}, {"name": "b", "alias": "d"}]}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "a", "bitmaps": [
        {"name": "b", "alias": "c"}, {"name": "e", "alias": "c"}]}]),
    ("block-bitmap-mapping", [{"node-name": "x", "alias": "a", "bitmaps": [
        {"name": "b", "alias": "c" * 300}]}]),
    ("block-bitmap-mapping", [{"node-name": "n", "alias": "a", "bitmaps": [
        {"name": "b", "alias": "c", "transform": {"persistent": True}}]}]),
]

CAPABILITY_CASES: list[list[tuple[str, Any]]] = [
    [("mapped-ram", True), ("return-path", True)],
    [("mapped-ram", True), ("xbzrle", True)],
    [("mapped-ram", True), ("postcopy-ram", True)],
    [("x-colo", True)],
    [("background-snapshot", True)],
    [("background-snapshot", True), ("return-path", True)],
    [("background-snapshot", True), ("auto-converge", True)],
    [("zero-copy-send", True)],
    [("multifd", True), ("zero-copy-send", True)],
    [("postcopy-preempt", True)],
    [("switchover-ack", True)],
    [("switchover-ack", True), ("return-path", True)],
    [("dirty-limit", True)],
    [("dirty-limit", True), ("auto-converge", True)],
    [("multifd", True), ("xbzrle", True)],
    [("multifd", True), ("postcopy-ram", True)],
    [("x-ignore-shared", True), ("postcopy-ram", True)],
    [("block", True)],
    [("compress", True)],
    [("fixed-ram", True)],
    [("events", True), ("events", False)],
    [("events", "no")],
    [("events", 1)],
    [("nope", "x")],
    [(c, True) for c in ("rdma-pin-all", "auto-converge", "zero-blocks", "events",
                         "release-ram", "pause-before-switchover", "dirty-bitmaps",
                         "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
                         "validate-uuid")],
]


def _each_caps() -> list[Any]:
    """Each case from a clean state: set it, query, then turn everything off."""
    steps: list[Any] = []
    for case in CAPABILITY_CASES:
        steps += [_caps(*case), Q("query-migrate-capabilities"),
                  _caps(*[(c, False) for c in CAPABILITIES])]
    return steps


def _each_param() -> list[Any]:
    steps: list[Any] = []
    for name, value in PARAMETER_CASES:
        steps += [_p(name, value)]
    steps += [Q("query-migrate-parameters")]
    return steps


TABLE: dict[str, list[Any]] = {
    "query capabilities and parameters": [
        Q("query-migrate-capabilities"), Q("query-migrate-parameters"), STATUS, MIGRATE_Q,
    ],
    "set parameters, valid and invalid": _each_param(),
    "set capabilities, valid and invalid": _each_caps(),
    "several parameters: the first bad one in QEMU's order": [
        _params(throttle_trigger_threshold=0, multifd_channels=0),
        _params(multifd_channels=0, throttle_trigger_threshold=0),
        _params(multifd_channels=0, throttle_trigger_threshold="x"),
        _params(multifd_channels=0, bogus=1),
        _params(multifd_channels="a", bogus=1),
        _params(vcpu_dirty_limit=0, x_vcpu_dirty_limit_period=0),
        _params(zero_page_detection="none", multifd_zlib_level=10),
        _params(cpu_throttle_initial=30), _params(max_cpu_throttle=25),
        _params(max_cpu_throttle=10, cpu_throttle_initial=5),
        Q("query-migrate-parameters"),
    ],
    "mapped-ram and compression: refused one step later, and at migrate": [
        _caps(("mapped-ram", True)),
        _p("multifd-compression", "zstd"),
        _p("multifd-channels", 4),
        _p("multifd-compression", "none"),
        _p("tls-creds", ""),
        Q("migrate", {"uri": "file:{d}/a.mig"}),
        Q("migrate", {"uri": "tcp:127.0.0.1:1"}),
        MIGRATE_Q,
        _caps(("mapped-ram", False)),
        _p("multifd-compression", "none"),
        Q("query-migrate-parameters"),
    ],
    "zero-copy-send and compression": [
        _caps(("multifd", True), ("zero-copy-send", True)),
        _p("multifd-compression", "zstd"),
        _caps(("zero-copy-send", False)),
        _p("multifd-compression", "zstd"),
    ],
    "transport checks at migrate": [
        _caps(("mapped-ram", True)),
        Q("migrate", {"uri": "tcp:127.0.0.1:1"}),
        Q("migrate", {"uri": "exec:cat"}),
        _caps(("mapped-ram", False), ("multifd", True)),
        Q("migrate", {"uri": "file:{d}/a.mig"}),
        Q("migrate", {"uri": "exec:cat"}),
        _caps(("multifd", False)),
        _p("mode", "cpr-transfer"),
        Q("migrate", {"uri": "file:{d}/b.mig"}),
        Q("migrate", {"uri": "unix:{d}/none.sock"}),
        _p("mode", "normal"),
        Q("migrate", {"uri": "bogus:3"}),
        Q("migrate", {"uri": "file:{d}/c.mig,offset=x"}),
        Q("migrate", {"uri": "tcp:"}),
        Q("migrate", {"uri": "fd:nope"}),
        Q("migrate", {"uri": "fd:3"}),
        Q("migrate", {"uri": "file:{d}/a.mig", "channels": [
            {"channel-type": "main", "addr": {"transport": "file", "filename": "{d}/x",
                                              "offset": 0}}]}),
        Q("migrate", {"uri": "file:{d}/a.mig", "resume": True}),
        MIGRATE_Q,
    ],
    "a save leaves the guest postmigrate; a second migrate is refused; cont": [
        STATUS,
        Q("migrate", {"uri": "file:{d}/s.mig"}), W(), STATUS, MIGRATE_Q,
        Q("migrate", {"uri": "file:{d}/s2.mig"}),
        Q("migrate-set-capabilities", {"capabilities": []}),
        Q("stop"), STATUS,
        Q("cont"), STATUS, Q("cont"), Q("stop"), STATUS,
        Q("migrate", {"uri": "file:{d}/s3.mig"}), W(), STATUS,
        _hmp("info status"), _hmp("info migrate"),
        E(),
    ],
    "events of a paused save": [
        EVENTS_ON,
        Q("migrate", {"uri": "file:{d}/e.mig"}), W(), E(),
        STATUS, MIGRATE_Q, _hmp("info migrate"),
    ],
    "events of a running save": [
        EVENTS_ON, Q("cont"), E(),
        Q("migrate", {"uri": "file:{d}/e.mig"}), W(), E(), STATUS,
        Q("cont"), E(), STATUS,
    ],
    "events of a mapped-ram multifd save": [
        EVENTS_ON, _caps(("mapped-ram", True), ("multifd", True)), Q("cont"),
        Q("migrate", {"uri": "file:{d}/m.mig"}), W(), E(), MIGRATE_Q,
    ],
    "cancel": [
        EVENTS_ON, _p("max-bandwidth", 100000), Q("cont"),
        Q("migrate", {"uri": "file:{d}/c.mig"}), S(0.3),
        Q("migrate_cancel"), W(), E(), MIGRATE_Q, STATUS, _hmp("info migrate"),
    ],
    "pause-before-switchover and migrate-continue": [
        EVENTS_ON, _caps(("pause-before-switchover", True)),
        Q("migrate-continue", {"state": "pre-switchover"}),
        Q("migrate", {"uri": "file:{d}/p.mig"}), W(("pre-switchover",)), E(), STATUS,
        Q("migrate-continue", {"state": "active"}),
        Q("migrate-continue", {"state": "pre-switchover"}), W(), E(), STATUS,
    ],
    "a failed migration: the error is the answer and the state": [
        EVENTS_ON,
        Q("migrate", {"uri": "file:/nonexistent/dir/x"}), E(), MIGRATE_Q, STATUS,
        _hmp("info migrate"),
    ],
    "getfd, closefd and fd: to a file": [
        Q("getfd", {"fdname": "a"}),
        O("p", "{d}/pipe", os.O_WRONLY | os.O_CREAT),
        Q("getfd", {"fdname": "1abc"}, fds=("p",)),
        O("p", "{d}/pipe", os.O_WRONLY | os.O_CREAT),
        Q("getfd", {"fdname": "a"}, fds=("p",)),
        O("p", "{d}/pipe", os.O_WRONLY | os.O_CREAT),
        Q("getfd", {"fdname": "a"}, fds=("p",)),
        Q("closefd", {"fdname": "nope"}), Q("closefd", {"fdname": "a"}),
        Q("closefd", {"fdname": "a"}),
        EVENTS_ON,
        O("f", "{d}/fd.mig", os.O_WRONLY | os.O_CREAT),
        Q("getfd", {"fdname": "mig"}, fds=("f",)),
        _caps(("mapped-ram", True)),
        Q("migrate", {"uri": "fd:mig"}),
        _caps(("mapped-ram", False)),
        Q("migrate", {"uri": "fd:mig"}), W(), E(), MIGRATE_Q, STATUS,
        Q("closefd", {"fdname": "mig"}),
    ],
    "add-fd, remove-fd, query-fdsets": [
        Q("add-fd"),
        O("a", "{d}/x", os.O_WRONLY | os.O_CREAT), Q("add-fd", fds=("a",)),
        O("a", "{d}/x", os.O_WRONLY | os.O_CREAT), Q("add-fd", {"opaque": "hello"}, fds=("a",)),
        O("a", "{d}/x", os.O_WRONLY | os.O_CREAT), Q("add-fd", {"fdset-id": 5}, fds=("a",)),
        O("a", "{d}/x", os.O_WRONLY | os.O_CREAT),
        Q("add-fd", {"fdset-id": 5, "opaque": "x"}, fds=("a",)),
        O("a", "{d}/x", os.O_WRONLY | os.O_CREAT), Q("add-fd", {"fdset-id": -1}, fds=("a",)),
        O("a", "{d}/x", os.O_WRONLY | os.O_CREAT), Q("add-fd", fds=("a",)),
        Q("add-fd", {"fdset-id": "x"}),
        Q("query-fdsets"),
        Q("remove-fd", {"fdset-id": 7}), Q("remove-fd", {"fdset-id": 5, "fd": 99999}),
        Q("remove-fd", {"fdset-id": 0}), Q("remove-fd", {"fdset-id": 0}),
        Q("query-fdsets"),
    ],
    "file:/dev/fdset/N: flags must match, as libvirt passes them": [
        Q("migrate", {"uri": "file:/dev/fdset/3"}),
        O("r", "{d}/ro.mig", os.O_RDONLY | os.O_CREAT),
        Q("add-fd", {"fdset-id": 3}, fds=("r",)),
        Q("migrate", {"uri": "file:/dev/fdset/3"}), MIGRATE_Q,
        O("w", "{d}/w.mig", os.O_WRONLY | os.O_CREAT),
        Q("add-fd", {"fdset-id": 6}, fds=("w",)),
        EVENTS_ON,
        Q("migrate", {"uri": "file:/dev/fdset/6"}), W(), E(), MIGRATE_Q, STATUS,
        Q("query-fdsets"),
    ],
    "mapped-ram, multifd and direct-io through an fd set": [
        _caps(("mapped-ram", True), ("multifd", True)),
        _p("direct-io", True),
        O("d", "{d}/../direct-{d_name}.mig", os.O_WRONLY | os.O_CREAT | os.O_DIRECT),
        O("n", "{d}/../direct-{d_name}.mig", os.O_WRONLY),
        Q("add-fd", {"fdset-id": 8}, fds=("d",)),
        Q("add-fd", {"fdset-id": 8}, fds=("n",)),
        Q("migrate", {"uri": "file:/dev/fdset/8"}), W(), MIGRATE_Q, STATUS,
    ],
    "query-version and query-status": [Q("query-version"), STATUS, Q("stop"), STATUS],
    "HMP": [
        _hmp("info status"), _hmp("  info   status  "), _hmp("info status extra"),
        _hmp("info migrate"), _hmp("info ramblock"), _hmp("info migrate_capabilities"),
        _hmp("info migrate_parameters"), _hmp("info version"), _hmp("info nothing"),
        _hmp("bogus"), _hmp(""),
        _hmp("migrate_set_capability nope on"), _hmp("migrate_set_capability events maybe"),
        _hmp("migrate_set_capability events"), _hmp("migrate_set_capability events on"),
        _hmp("migrate_set_capability xbzrle on"), _hmp("migrate_set_capability multifd on"),
        _hmp("migrate_set_capability xbzrle off"),
        _hmp("migrate_set_parameter max-bandwidth 100"),
        _hmp("migrate_set_parameter max-bandwidth 1G"),
        _hmp("migrate_set_parameter max-bandwidth x"),
        _hmp("migrate_set_parameter downtime-limit 500"),
        _hmp("migrate_set_parameter downtime-limit x"),
        _hmp("migrate_set_parameter multifd-channels 0"),
        _hmp("migrate_set_parameter multifd-channels 300"),
        _hmp("migrate_set_parameter xbzrle-cache-size 1M"),
        _hmp("migrate_set_parameter direct-io on"), _hmp("migrate_set_parameter direct-io x"),
        _hmp("migrate_set_parameter multifd-compression lz"),
        _hmp("migrate_set_parameter nope 1"), _hmp("migrate_set_parameter max-bandwidth"),
        _hmp("migrate_set_parameter block-bitmap-mapping x"),
        _hmp("info migrate_capabilities"), _hmp("info migrate_parameters"),
        _hmp("migrate bogus:x"), _hmp("migrate"),
        _hmp("migrate_continue pre-switchover"), _hmp("migrate_incoming file:/x"),
        _hmp("cont"), _hmp("info status"), _hmp("stop"), _hmp("info status"),
        _hmp("migrate -d file:{d}/h.mig"), W(), _hmp("info status"), _hmp("info migrate"),
        _hmp("migrate file:{d}/h2.mig"), _hmp("cont"), _hmp("migrate file:{d}/h2.mig"), W(),
        _hmp("info status"),
    ],
    "socket targets that do not answer: the migration fails in its thread": [
        EVENTS_ON,
        Q("migrate", {"uri": "unix:{d}/nobody.sock"}), W(), E(), MIGRATE_Q, STATUS,
        Q("migrate", {"uri": "tcp:127.0.0.1:1"}), W(), E(), MIGRATE_Q, STATUS,
    ],
    "migrate-incoming without -incoming": [
        Q("migrate-incoming", {"uri": "file:{d}/none.mig"}),
        Q("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}),
    ],
}

# Rows whose peers start with -incoming defer.
INCOMING: dict[str, list[Any]] = {
    "inmigrate: stop, cont, migrate, an open error, then the state it leaves": [
        STATUS, _hmp("info status"), Q("stop"), Q("cont"), STATUS,
        Q("migrate", {"uri": "file:{d}/x.mig"}),
        EVENTS_ON,
        Q("migrate-incoming", {"uri": "file:{d}/nonexistent.mig", "exit-on-error": False}),
        E(), MIGRATE_Q, STATUS,
        Q("migrate-incoming", {"uri": "file:{d}/nonexistent.mig"}),
        _caps(("multifd", True)),
    ],
    "listening on a tcp port: the address in query-migrate and info migrate": [
        EVENTS_ON,
        Q("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}), E(), MIGRATE_Q,
        _hmp("info migrate"), STATUS,
        Q("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}),
    ],
    "a failed load with exit-on-error false: failed, and the process stays": [
        EVENTS_ON,
        Q("migrate-incoming", {"uri": "file:{d}/../garbage.bin", "exit-on-error": False}),
        W(), E(), STATUS, Q("cont"), STATUS,
        Q("migrate", {"uri": "file:{d}/x.mig"}),
        Q("migrate-incoming", {"uri": "file:{d}/../garbage.bin"}),
        _caps(("multifd", True)), _caps(("postcopy-preempt", True)),
    ],
    "a failed load with exit-on-error (the default): the process exits with status 1": [
        Q("migrate-incoming", {"uri": "file:{d}/../garbage.bin"}), X(),
    ],
}


@pytest.mark.qemu
@pytest.mark.parametrize("name", list(TABLE) + list(INCOMING))
def test_same_answers_as_qemu(qemu: str, tmp_path: Path, name: str) -> None:
    (tmp_path / "garbage.bin").write_bytes(b"not a migration stream\n" * 200)
    steps = TABLE.get(name) or INCOMING[name]
    pair = peers(qemu, tmp_path, incoming=name in INCOMING)
    try:
        recs = {}
        for p in pair:
            side = [_side(st, p.name) for st in steps]
            recs[p.name] = run(p, side)
    finally:
        for p in pair:
            p.close()
    ours, theirs = recs["fixedram"], recs["qemu"]
    if os.environ.get("QMP_TABLE_DUMP"):  # to read what was compared
        for a, b in zip(ours, theirs, strict=True):
            print(f"{b[0]}: qemu {b[1]}\n{'':{len(b[0])}}  ours {a[1]}")
    diffs = [f"step {i} ({b[0]}):\n fixedram: {a[1]}\n     qemu: {b[1]}"
             for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert not diffs, "\n".join(diffs)


def _side(st: Any, name: str) -> Any:
    if isinstance(st, O) and "{d_name}" in st.path:
        return O(st.name, st.path.replace("{d_name}", name), st.flags)
    return st


def test_parameter_and_capability_counts() -> None:
    assert len(CAPABILITIES) == 22
    assert len([p for p in PARAMETERS if p != "block-bitmap-mapping"]) == 28


MIGRATION_COMMANDS = {
    "migrate", "migrate-incoming", "migrate_cancel", "migrate-continue", "query-migrate",
    "migrate-set-capabilities", "query-migrate-capabilities", "migrate-set-parameters",
    "query-migrate-parameters", "getfd", "closefd", "add-fd", "remove-fd", "query-fdsets",
    "query-status", "stop", "cont", "quit", "query-version", "query-commands",
    "query-qmp-schema", "human-monitor-command", "qmp_capabilities",
}


@pytest.mark.qemu
def test_introspection_describes_what_is_served_as_qemu_does(qemu: str, tmp_path: Path) -> None:
    """query-commands lists the migration commands; query-qmp-schema describes
    each command and event served here exactly as QEMU 10 describes it."""
    pair = peers(qemu, tmp_path)
    try:
        got = {p.name: (p.ask({"execute": "query-commands"})["return"],
                        p.ask({"execute": "query-qmp-schema"})["return"]) for p in pair}
        greetings = {p.name: p.greeting["QMP"]["version"]["qemu"] for p in pair}
    finally:
        for p in pair:
            p.close()
    theirs_cmds = {c["name"] for c in got["qemu"][0]}
    ours_cmds = {c["name"] for c in got["fixedram"][0]}
    assert ours_cmds >= MIGRATION_COMMANDS
    assert ours_cmds - theirs_cmds == {"x-query-ram-digest"}  # fixedram's own, x- as unstable
    ours_schema, theirs_schema = got["fixedram"][1], got["qemu"][1]
    served = [e["name"] for e in ours_schema if e["meta-type"] in ("command", "event")]
    assert set(served) >= MIGRATION_COMMANDS | {"STOP", "RESUME", "MIGRATION", "MIGRATION_PASS"}
    for name in served:
        if name == "x-query-ram-digest":
            continue
        assert resolve(ours_schema, name) == resolve(theirs_schema, name), name
    # The version reported is the one whose answers these are (10.0; the
    # micro version fixedram reports is the release it was checked against).
    ours_v, theirs_v = greetings["fixedram"], greetings["qemu"]
    assert (ours_v["major"], ours_v["minor"]) == (theirs_v["major"], theirs_v["minor"])
