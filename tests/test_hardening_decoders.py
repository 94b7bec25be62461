"""Forged compressed libvirt images: cut short, or with a flipped byte, for every decoder.

The images are a real save of the built-in guest behind fixedram's libvirt
header, compressed by the real gzip, bzip2, xz, lzop and zstd programs, as
libvirt's ``save_image_format`` writes them. Each forged image must be
refused by ``extract`` and ``verify`` with one line naming the file, the
problem and two offsets (how far the decoder had read in the image, how much
stream it had produced), a non-zero exit status, and nothing left under the
output name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixedram.format.libvirt import LibvirtHeader
from fixedram.format.machine import MachineState
from fixedram.format.writer import BlockSpec, StreamWriter

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]
KINDS = ("gzip", "bzip2", "xz", "lzop", "zstd")
CUTS = (1, 2, 3, 4, "half")
TRUNCATED = re.compile(r"([^\s(]+): (\w+) data truncated at decompressed stream byte (\d+): "
                       r"the image ends [^()]+(?:\([^()]*\))? \(at byte offset (\d+)\)")
CORRUPT = re.compile(r"([^\s(]+): corrupt (\w+) data after decompressed stream byte (\d+): "
                     r".+ \(at byte offset (\d+)\)")


@dataclass
class Images:
    dir: Path
    stream: bytes  # the QEMU stream every image holds
    header: bytes  # libvirt header, XML and padding before the compressed data
    compressed: dict[str, bytes]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    d = tmp_path_factory.mktemp("decoders")
    subprocess.run([*FIXEDRAM, "save", f"file:{d / 'g.mig'}", "--ram", "16M"], check=True,
                   capture_output=True)
    stream = (d / "g.mig").read_bytes()
    header = LibvirtHeader.new(b"<domain><name>g</name></domain>", format="zstd").encode()
    comp = {k: subprocess.run([k, "-c"], input=stream, capture_output=True, check=True).stdout
            for k in KINDS}
    return Images(d, stream, header, comp)


def forge(images: Images, kind: str, data: bytes, tmp_path: Path) -> Path:
    """``data`` behind a libvirt header saying ``kind``."""
    hdr = LibvirtHeader.new(b"<domain><name>g</name></domain>", format=kind).encode()
    assert len(hdr) == len(images.header)
    p = tmp_path / f"forged-{kind}.sav"
    p.write_bytes(hdr + data)
    return p


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """The command, with ``stdin`` behind a real pipe."""
    p = subprocess.run([*FIXEDRAM, *args], input=stdin, capture_output=True, timeout=120,
                       check=False, stdin=None if stdin is not None else subprocess.DEVNULL)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(),
                                       p.stderr.decode())


def one_line(p: subprocess.CompletedProcess[str], *, stdout: bool = False) -> str:
    """The one line a refused command printed (verify gives its verdict on stdout)."""
    assert p.returncode != 0, p.stdout + p.stderr
    text = (p.stdout if stdout else p.stderr).strip()
    assert "Traceback" not in p.stderr, p.stderr
    assert len(text.splitlines()) == 1, text
    return text


def refused(image: Path, pattern: re.Pattern[str], tmp_path: Path) -> list[tuple[int, int]]:
    """extract and verify of ``image`` both refuse it with ``pattern``, naming the image;
    returns (decompressed stream byte, image byte offset) from each."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    got = []
    for cmd, line in (("extract", one_line(run("extract", str(image), "-o", str(out)))),
                      ("verify", one_line(run("verify", str(image)), stdout=True))):
        m = pattern.search(line)
        assert m is not None, f"{cmd}: {line}"
        assert m.group(1) == str(image), line
        got.append((int(m.group(3)), int(m.group(4))))
        assert "Inappropriate ioctl" not in line
        assert os.listdir(work) == [], f"{cmd} left {os.listdir(work)}"  # not even hidden
    return got


@pytest.mark.parametrize("kind", KINDS)
def test_whole_images_extract_and_verify(images: Images, kind: str, tmp_path: Path) -> None:
    # The same images uncut pass: the refusals below are the cuts' doing.
    image = forge(images, kind, images.compressed[kind], tmp_path)
    p = run("verify", str(image))
    assert p.returncode == 0 and p.stdout.strip() == f"{image}: OK", p.stdout + p.stderr
    out = tmp_path / "out"
    p = run("extract", str(image), "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert (out / "pc.ram.bin").stat().st_size == 16 << 20


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_cut_image_is_truncated_at_its_end(images: Images, kind: str, cut: int | str,
                                           tmp_path: Path) -> None:
    data = images.compressed[kind]
    keep = len(data) // 2 if cut == "half" else len(data) - int(cut)
    image = forge(images, kind, data[:keep], tmp_path)
    size = image.stat().st_size
    for produced, at in refused(image, TRUNCATED, tmp_path):
        # The decoder read the whole image: the cut is where the file ends.
        assert at == size
        if cut == "half":
            assert len(images.stream) // 4 < produced < len(images.stream)
        else:  # only the end's marker, trailer or checksum is missing: all the stream came
            assert produced == len(images.stream)


@pytest.mark.parametrize("kind", KINDS)
def test_cut_image_on_a_pipe(images: Images, kind: str) -> None:
    # On a pipe lzop reads through fixedram's own pipe (not the file): the same verdict.
    data = LibvirtHeader.new(b"<domain><name>g</name></domain>", format=kind).encode() + \
        images.compressed[kind][:-1]
    line = one_line(run("verify", "-", stdin=data), stdout=True)
    m = TRUNCATED.search(line)
    assert m is not None and m.group(1) == "stdin", line
    assert (int(m.group(3)), int(m.group(4))) == (len(images.stream), len(data))


def test_zstd_checksum_flipped(images: Images, tmp_path: Path) -> None:
    data = bytearray(images.compressed["zstd"])
    assert data[4] & 4, "zstd wrote no content checksum"  # Content_Checksum_flag
    data[-2] ^= 0x10
    image = forge(images, "zstd", bytes(data), tmp_path)
    for produced, at in refused(image, CORRUPT, tmp_path):
        assert at == image.stat().st_size
        assert len(images.stream) // 2 < produced <= len(images.stream)
    assert "doesn't match checksum" in run("verify", str(image)).stdout


# A byte of each format's own check, where its decoder finds it: gzip's CRC32
# trailer, the first bzip2 block's CRC (after "BZh9" and the block magic),
# xz's stream footer CRC32, an lzop block in the middle (each block has its
# checksum), zstd's content checksum.
CHECKS = {"gzip": -8, "bzip2": 10, "xz": -12, "lzop": None, "zstd": -3}


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_check_names_both_offsets(images: Images, kind: str, tmp_path: Path) -> None:
    data = bytearray(images.compressed[kind])
    pos = CHECKS[kind]
    at_data = len(data) // 2 if pos is None else pos % len(data)
    data[at_data] ^= 0x10
    image = forge(images, kind, bytes(data), tmp_path)
    flipped = len(images.header) + at_data
    size = image.stat().st_size
    for produced, at in refused(image, CORRUPT, tmp_path):
        # Found once the decoder had read the flipped byte, not past the file's end.
        assert flipped < at <= size
        assert produced <= len(images.stream)
        if at_data > len(data) // 2:  # a check at the end: the stream came before it
            assert produced >= len(images.stream) // 2
        else:
            assert at < size


@pytest.mark.parametrize("kind", KINDS)
def test_cut_after_bytes_past_the_stream_end(kind: str, tmp_path: Path) -> None:
    # A stream without device sections (nothing makes the walk read on to the
    # end), 3 MiB of zeros behind it: the walk stops at the trailer, and the
    # decoder's end, cut off, must still be reached.
    buf = bytearray()
    w = StreamWriter(buf.extend, MachineState("pc-q35-10.0"), [BlockSpec("pc.ram", 16 * 4096)])
    w.begin()
    w.begin_part(end=True)
    for i in range(16):
        w.pages(0, i, bytes([i + 1]) * 4096)
    w.end_part()
    w.finish()
    data = subprocess.run([kind, "-c"], input=bytes(buf) + bytes(3 << 20), capture_output=True,
                          check=True).stdout
    hdr = LibvirtHeader.new(b"<domain><name>g</name></domain>", format=kind).encode()
    whole = tmp_path / "whole.sav"
    whole.write_bytes(hdr + data)
    p = run("verify", str(whole))
    assert p.returncode == 0 and p.stdout.strip() == f"{whole}: OK", p.stdout + p.stderr
    image = tmp_path / "cut.sav"
    image.write_bytes(hdr + data[:-1])
    for produced, at in refused(image, TRUNCATED, tmp_path):
        assert at == image.stat().st_size
        assert produced == len(buf) + (3 << 20)
