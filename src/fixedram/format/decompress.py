"""Decompression for one-pass inputs: gzip, bzip2, xz, zstd and lzop, on a read-ahead thread.

Imported only when an input is compressed: the decoders and their threads cost
every other command import time for nothing.
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import subprocess
import threading
import zlib
from typing import IO, TYPE_CHECKING, Any, cast

from ..errors import CorruptFile, FixedramError, TruncatedFile, UnsupportedFeature
from .readahead import ReadAhead
from .sequential import READ_SIZE

if TYPE_CHECKING:
    from .sequential import _Prefixed

__all__ = ["Decoded"]

GZIP_READ = 64 << 10
# Most memory an xz stream may make the decoder allocate (zstd's own default limit
# is a 128 MiB window).
XZ_MEMLIMIT = 256 << 20
# lzop as libvirt runs it to read its images (qemuSaveImageGetCompressionCommand).
LZOP_COMMAND = ("lzop", "-dc", "--ignore-warn")


class Decoded(ReadAhead):
    """The decompressed stream, produced by a thread and read in order.

    The thread decodes a chunk at a time into a bounded queue, so memory stays
    at a few MiB however large the image and however well it compressed; a
    decoding error names the offset in the decompressed stream where it broke.
    """

    def __init__(self, kind: str, src: _Prefixed, name: str, path: str) -> None:
        super().__init__(name, f"fixedram-{kind}-decoder")
        self.kind = kind
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._feeder: threading.Thread | None = None
        self._dec = self._open(kind, src)
        self.start()

    def _open(self, kind: str, src: _Prefixed) -> Any:
        if kind in ("gzip", "bzip2", "xz"):
            return _Stdlib(kind, src)
        if kind == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(
                cast("IO[bytes]", src), read_size=READ_SIZE, read_across_frames=True)
        if kind == "lzop":
            return self._open_lzop(src)
        raise ValueError(kind)

    def _open_lzop(self, src: _Prefixed) -> IO[bytes]:
        # No maintained Python binding reads lzop's file format (python-lzo
        # only handles single LZO blocks): run the lzop tool, as libvirt does.
        direct = not src.prefix
        try:
            proc = subprocess.Popen(LZOP_COMMAND, stdin=src.raw.fd if direct else subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise UnsupportedFeature("reading an lzop-compressed image needs the lzop program "
                                     "(Debian package lzop)", path=self.path) from None
        self._proc = proc
        if not direct:
            self._feeder = threading.Thread(target=self._feed, args=(src, proc), daemon=True,
                                            name="fixedram-lzop-feeder")
            self._feeder.start()
        assert proc.stdout is not None
        return proc.stdout

    @staticmethod
    def _feed(src: _Prefixed, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None
        try:
            while True:
                b = src.read(READ_SIZE)
                if not b:
                    break
                proc.stdin.write(b)
        except (OSError, ValueError):
            pass  # lzop stopped reading: its exit status says why
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def readinto(self, mv: memoryview) -> int:
        n: int = self._dec.readinto(mv)
        return n

    def finished(self) -> None:
        if self._proc is None:
            return
        assert self._proc.stderr is not None
        err = self._proc.stderr.read().decode("utf-8", "replace").strip()
        rc = self._proc.wait()
        if rc not in (0, 2):  # 2: warnings only, which libvirt ignores too
            raise _LzopError(err.splitlines()[-1] if err else f"lzop exit status {rc}")

    def error(self, e: BaseException) -> FixedramError:
        if isinstance(e, FixedramError) and not isinstance(e, _LzopError):
            return e
        if isinstance(e, EOFError):
            return TruncatedFile(f"the {self.kind} data end before their end-of-stream marker "
                                 "(the image is cut short)", path=self.name, offset=self.pos)
        if isinstance(e, _LzopError) and "unexpected end of file" in str(e):
            return TruncatedFile(f"the {self.kind} data are cut short ({e})", path=self.name,
                                 offset=self.pos)
        if isinstance(e, (OSError, lzma.LZMAError, zlib.error, _LzopError)) or \
                type(e).__name__ == "ZstdError":
            return CorruptFile(f"corrupt {self.kind} data: {e}", path=self.name,
                               offset=self.pos)
        raise e

    def close(self) -> bool:
        self._stop.set()
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
        # A thread blocked reading a pipe whose writer stalls is left behind
        # (a daemon): it holds no output.
        stopped = super().close()
        if self._proc is not None:
            for f in (self._proc.stdout, self._proc.stderr, self._proc.stdin):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        with contextlib.suppress(Exception):
            self._dec.close()
        return stopped


class _LzopError(FixedramError):
    pass


class _Stdlib:
    """gzip, bzip2 or xz data through the standard library's decompressor objects,
    driven directly: 1 MiB of input per call and at most ``n`` bytes out. (Their
    file classes feed 8 KiB at a time: measured 2-3x slower on RAM images.)
    Concatenated streams (multi-member gzip, pbzip2, xz) are read one after another.
    """

    def __init__(self, kind: str, src: _Prefixed) -> None:
        self.kind = kind
        self.src = src
        self.d = self._new()
        self.pending = b""  # input not yet given to the decompressor
        self.done = False

    def _new(self) -> Any:
        if self.kind == "xz":
            # A header can ask for a 1.5 GiB dictionary; xz -9 needs 65 MiB.
            return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
        if self.kind == "bzip2":
            return bz2.BZ2Decompressor()
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # one gzip member

    def readinto(self, mv: memoryview) -> int:
        out = self.read(len(mv))
        mv[:len(out)] = out
        return len(out)

    def read(self, n: int) -> bytes:
        while not self.done:
            d = self.d
            if not self.pending and (self.kind == "gzip" or d.needs_input):
                # zlib hands back the input it has not used as a new bytes object
                # on every call: small pieces keep that copy small.
                self.pending = self.src.read(GZIP_READ if self.kind == "gzip" else READ_SIZE)
                if not self.pending:
                    raise EOFError("compressed data end before the end-of-stream marker")
            if self.kind == "gzip":
                out = d.decompress(self.pending, n)
                self.pending = d.unconsumed_tail
            else:
                data = self.pending if d.needs_input else b""
                self.pending = b"" if d.needs_input else self.pending
                out = d.decompress(data, n)
            assert isinstance(out, bytes)
            if d.eof:
                self._next_stream()
            if out:
                return out
        return b""

    def _next_stream(self) -> None:
        """After one stream's end: the next one, or the end of the data. Zero
        bytes between or after streams are padding (xz allows it, the tools
        skip it); anything else must be another stream, or it is corrupt."""
        # (At a zlib stream's end its unused input is in unused_data, and also
        # still in unconsumed_tail: take it once.)
        tail = b"" if self.kind == "gzip" else self.pending
        rest = (self.d.unused_data + tail).lstrip(b"\0")
        while not rest:
            more = self.src.read(READ_SIZE)
            if not more:
                self.done = True
                return
            rest = more.lstrip(b"\0")
        self.d = self._new()
        self.pending = rest

    def close(self) -> None:
        pass
