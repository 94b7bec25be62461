"""Stream features QEMU can write that the QEMU tests here do not produce."""

from __future__ import annotations

import io

import pytest

from fixedram.errors import CorruptFile, FormatError, UnsupportedFeature
from fixedram.format.migfile import _StreamIndex
from fixedram.format.primitives import BE64, ByteReader
from fixedram.format.ram import encode_block_record
from fixedram.format.stream import encode_command, encode_footer, encode_header, encode_section_full
from fixedram.format.walker import StreamSummary, walk_stream

MiB = 1 << 20


def _ram_start(blocks: bytes, total: int, caps: tuple[str, ...] = ()) -> bytes:
    return (encode_header("pc-q35-10.0", list(caps)) + encode_section_full(1, 2, "ram", 0, 4)
            + BE64.pack(total | 4) + blocks)


def _walk(b: bytes) -> StreamSummary:
    idx = _StreamIndex("mem", 1 << 30)
    return walk_stream(ByteReader(io.BytesIO(b), "unit.mig"), idx, idx)


def test_postcopy_page_size_fields() -> None:
    blocks = (encode_block_record("a", 4 * MiB) + BE64.pack(2 * MiB)
              + encode_block_record("b", 4 * MiB) + BE64.pack(2 * MiB))
    s = _walk(_ram_start(blocks, 8 * MiB) + BE64.pack(0x10) + encode_footer(2) + b"\0")
    assert [(x.idstr, x.postcopy_page_size) for x in s.ram.blocks] == [("a", 2 * MiB),
                                                                        ("b", 2 * MiB)]


def test_ignore_shared_gpa() -> None:
    blocks = encode_block_record("pc.ram", 4 * MiB, gpa=0x100000)
    s = _walk(_ram_start(blocks, 4 * MiB, ("x-ignore-shared",)) + BE64.pack(0x10)
              + encode_footer(2) + b"\0")
    assert s.ram.blocks[0].gpa == 0x100000 and s.header.capabilities == ["x-ignore-shared"]


@pytest.mark.parametrize("flags,err,text", [
    (0x40, UnsupportedFeature, "XBZRLE"),
    (0x100, UnsupportedFeature, "compressed pages"),
    (0x80, UnsupportedFeature, "RDMA"),
    (0x400, CorruptFile, "unknown combination"),
    (0x0, CorruptFile, "unknown combination"),
])
def test_refused_records(flags: int, err: type[FormatError], text: str) -> None:
    b = _ram_start(encode_block_record("pc.ram", 4 * MiB), 4 * MiB) + BE64.pack(0x10)
    b += encode_footer(2) + b"\x02\x00\x00\x00\x02" + BE64.pack(flags) + b"\x06pc.ram"
    with pytest.raises(err, match=text) as ei:
        _walk(b)
    assert ei.value.offset == len(_ram_start(encode_block_record("pc.ram", 4 * MiB),
                                             4 * MiB)) + 8 + 5 + 5


def test_postcopy_command_refused_and_switchover_accepted() -> None:
    base = _ram_start(encode_block_record("pc.ram", 4 * MiB), 4 * MiB) + BE64.pack(0x10)
    base += encode_footer(2)
    s = _walk(base + encode_command(11) + b"\0")
    assert [c for _, c, _ in s.commands] == [11]
    with pytest.raises(UnsupportedFeature, match="postcopy"):
        _walk(base + encode_command(3, bytes(16)) + b"\0")


def test_block_total_must_add_up() -> None:
    b = _ram_start(encode_block_record("pc.ram", 4 * MiB), 2 * MiB)
    with pytest.raises(CorruptFile, match="not a page multiple within the announced total"):
        _walk(b)


def test_huge_block_is_refused_before_any_allocation() -> None:
    b = _ram_start(encode_block_record("pc.ram", 1 << 50), 1 << 50)
    with pytest.raises(CorruptFile, match="larger than 16 TiB") as ei:
        _walk(b)
    assert ei.value.offset == len(b) - 8
