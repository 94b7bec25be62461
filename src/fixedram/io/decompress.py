"""Decompression for one-pass inputs: gzip, bzip2, xz, zstd and lzop, on a read-ahead thread.

Imported only when an input is compressed: the decoders and their threads cost
every other command import time for nothing.
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import os
import subprocess
import threading
import zlib
from typing import IO, TYPE_CHECKING, Any, cast

from ..errors import CorruptFile, FixedramError, TruncatedFile, UnsupportedFeature
from .readahead import ReadAhead
from .stream import READ_SIZE

if TYPE_CHECKING:
    from .stream import Prefixed

__all__ = ["Decoded"]

GZIP_READ = 64 << 10
# Most memory an xz stream may make the decoder allocate (zstd's own default limit
# is a 128 MiB window).
XZ_MEMLIMIT = 256 << 20
# lzop as libvirt runs it to read its images (qemuSaveImageGetCompressionCommand).
LZOP_COMMAND = ("lzop", "-dc", "--ignore-warn")
# Where each decoder's data must end, for a truncation message.
_ENDS = {"gzip": "before its gzip member's trailer (CRC32 and length)",
         "bzip2": "before its bzip2 end-of-stream marker",
         "xz": "before its xz stream footer",
         "lzop": "before lzop's end-of-data marker"}


class Decoded(ReadAhead):
    """The decompressed stream, produced by a thread and read in order.

    The thread decodes a chunk at a time into a bounded queue, so memory stays
    at a few MiB however large the image and however well it compressed. A
    decoding error names the file and two offsets, taken on the thread when
    it broke: how far the decoder had read in the file (the "byte offset":
    the end of the file for a cut one), and how many bytes of stream it had
    handed out (all it could decode of a cut one; for corrupt data, those
    before the failing call, which the decompressor drops: up to a chunk).
    """

    def __init__(self, kind: str, src: Prefixed, name: str, path: str,
                 where: str = "image") -> None:
        super().__init__(name, f"fixedram-{kind}-decoder")
        self.kind = kind
        self.path = path
        self.where = where
        self.produced = 0  # decompressed bytes handed out by readinto (on the thread)
        self._src = src
        self._frames: _ZstdFrames | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._feeder: threading.Thread | None = None
        self._lzop_direct = False
        self._lzop_in = -1  # the read end of lzop's input pipe, kept to count what it left
        self._fed = 0
        self._fed_all = False
        self._feed_error: FixedramError | None = None
        self._in_base = src.raw.pos - len(src.prefix)  # file offset of the compressed data
        self._dec = self._open(kind, src)
        self.start()

    def _open(self, kind: str, src: Prefixed) -> Any:
        if kind in ("gzip", "bzip2", "xz"):
            return _Stdlib(kind, src)
        if kind == "zstd":
            import zstandard

            # The reader ends quietly when its input ends inside a frame: the
            # frames' structure, followed on the way in, says whether it did.
            self._frames = _ZstdFrames(src)
            return zstandard.ZstdDecompressor().stream_reader(
                cast("IO[bytes]", self._frames), read_size=READ_SIZE, read_across_frames=True)
        if kind == "lzop":
            return self._open_lzop(src)
        raise ValueError(kind)

    def _open_lzop(self, src: Prefixed) -> IO[bytes]:
        # No maintained Python binding reads lzop's file format (python-lzo
        # only handles single LZO blocks): run the lzop tool, as libvirt does.
        # A regular file it reads itself: its file offset, shared with ours,
        # then says how far it read. A pipe, or bytes already read, go through
        # a pipe of our own, whose read end we keep to count what lzop left.
        self._lzop_direct = not src.prefix and not src.raw.is_pipe
        if self._lzop_direct:
            stdin = src.raw.fd
        else:
            stdin, wfd = os.pipe2(os.O_CLOEXEC)
            self._lzop_in = stdin
        try:
            proc = subprocess.Popen(LZOP_COMMAND, stdin=stdin,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            if not self._lzop_direct:
                os.close(wfd)
            raise UnsupportedFeature("reading an lzop-compressed image needs the lzop program "
                                     "(Debian package lzop)", path=self.path) from None
        self._proc = proc
        if not self._lzop_direct:
            self._feeder = threading.Thread(target=self._feed, args=(src, wfd), daemon=True,
                                            name="fixedram-lzop-feeder")
            self._feeder.start()
        assert proc.stdout is not None
        return proc.stdout

    def _feed(self, src: Prefixed, wfd: int) -> None:
        try:
            while True:
                b = src.read(READ_SIZE)
                if not b:
                    # Before the close: lzop can only meet the end after it.
                    self._fed_all = True
                    break
                mv = memoryview(b)
                while mv:
                    n = os.write(wfd, mv)
                    self._fed += n
                    mv = mv[n:]
        except OSError:
            pass  # lzop stopped reading: its exit status says why
        except FixedramError as e:
            self._feed_error = e  # the input failed: that, not lzop's short read, is the error
        finally:
            os.close(wfd)

    def readinto(self, mv: memoryview) -> int:
        try:
            n: int = self._dec.readinto(mv)
        except FixedramError:
            raise
        except Exception as e:  # typed here, on the thread: the offsets are this moment's
            raise self._typed(e) from e
        self.produced += n
        return n

    def finished(self) -> None:
        if self._frames is not None:
            if self._frames.state == _UNKNOWN:  # accepted by the decoder: a legacy frame
                at = self._in_base + self._frames.unknown_at
                raise self._corrupt(f"no zstd frame at byte {at} of the {self.where} "
                                    "(a format this reader cannot check)")
            why = self._frames.unfinished()
            if why is not None:
                raise self._truncated(why)
        if self._proc is None:
            return
        assert self._proc.stderr is not None
        err = self._proc.stderr.read().decode("utf-8", "replace").strip()
        rc = self._proc.wait()
        if rc in (0, 2):  # 2: warnings only, which libvirt ignores too
            return
        if self._feed_error is not None:
            raise self._feed_error
        msg = err.splitlines()[-1] if err else f"lzop exit status {rc}"
        # lzop reports a short read from its standard input with strerror of
        # a stale errno (its isatty() check's ENOTTY: "Inappropriate ioctl
        # for device"): whether it read all the input says it was cut short.
        if self._lzop_read_all():
            raise self._truncated(_ENDS["lzop"])
        raise self._corrupt(msg)

    def _lzop_read_all(self) -> bool:
        if self._lzop_direct:
            fd = self._src.raw.fd
            return os.lseek(fd, 0, os.SEEK_CUR) >= os.fstat(fd).st_size
        return self._fed_all and self._lzop_unread() == 0

    def _lzop_unread(self) -> int:
        import fcntl
        import termios

        buf = bytearray(4)
        fcntl.ioctl(self._lzop_in, termios.FIONREAD, buf)
        return int.from_bytes(buf, "little")

    def in_offset(self) -> int:
        """File offset up to which the decoder had read the compressed data."""
        if self._proc is not None:
            if self._lzop_direct:
                return os.lseek(self._src.raw.fd, 0, os.SEEK_CUR)
            return self._in_base + self._fed - self._lzop_unread()
        held = self._dec.held if isinstance(self._dec, _Stdlib) else 0
        return self._src.raw.pos - len(self._src.prefix) - held

    def _truncated(self, why: str) -> TruncatedFile:
        return TruncatedFile(f"{self.kind} data truncated at decompressed stream byte "
                             f"{self.produced}: the {self.where} ends {why}",
                             path=self.path, offset=self.in_offset())

    def _corrupt(self, why: object) -> CorruptFile:
        # The decompressor drops what the failing call produced: the
        # corruption is after the bytes handed out, within what it had read.
        return CorruptFile(f"corrupt {self.kind} data after decompressed stream byte "
                           f"{self.produced}: {why}", path=self.path, offset=self.in_offset())

    def _typed(self, e: Exception) -> FixedramError:
        if isinstance(e, EOFError):
            return self._truncated(_ENDS[self.kind])
        if isinstance(e, (OSError, lzma.LZMAError, zlib.error)) or \
                type(e).__name__ == "ZstdError":
            return self._corrupt(e)
        raise e

    def close(self) -> bool:
        self._stop.set()
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
        if self._lzop_in >= 0:  # a feeder blocked on a full pipe gets EPIPE
            os.close(self._lzop_in)
            self._lzop_in = -1
        # A thread blocked reading a pipe whose writer stalls is left behind
        # (a daemon): it holds no output.
        stopped = super().close()
        if self._proc is not None:
            for f in (self._proc.stdout, self._proc.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        with contextlib.suppress(Exception):
            self._dec.close()
        return stopped


class _Stdlib:
    """gzip, bzip2 or xz data through the standard library's decompressor objects,
    driven directly: 1 MiB of input per call and at most ``n`` bytes out. (Their
    file classes feed 8 KiB at a time: measured 2-3x slower on RAM images.)
    Concatenated streams (multi-member gzip, pbzip2, xz) are read one after another.
    """

    def __init__(self, kind: str, src: Prefixed) -> None:
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

    @property
    def held(self) -> int:
        """Input bytes read but not given to the decompressor yet. (zlib's
        input is all given to each call: an error is in it.)"""
        return 0 if self.kind == "gzip" else len(self.pending)

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


# Frame magics (little-endian): a zstd frame, and the 16 skippable ones.
_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE = 0x184D2A50
# What the walker expects next, and its size.
_MAGIC, _DESCRIPTOR, _SKIP_SIZE, _BLOCK, _UNKNOWN = range(5)
_NEED = (4, 1, 4, 3)


class _ZstdFrames:
    """The compressed bytes on their way to the zstd reader, their frames followed.

    python-zstandard's stream reader ends quietly when its input ends inside
    a frame (it checks the content checksum when it gets to it): frame
    headers and block headers, read here, say whether the input reached the
    last block and the checksum its frame header announced. Block contents
    are passed over unread: a few operations per block (128 KiB of stream).
    """

    def __init__(self, src: Prefixed) -> None:
        self.src = src
        self.pos = 0  # compressed bytes passed on
        self.state = _MAGIC
        self.skip = 0  # bytes to pass over before the next header
        self.part = b""  # a header split between two reads
        self.checksum = False  # the current frame has a content checksum
        self.last = False  # the current frame's last block has begun
        self.frames = 0
        self.unknown_at = -1

    def read(self, n: int = -1) -> bytes:
        b = self.src.read(n)
        if b and self.state != _UNKNOWN:
            self._walk(b)
        self.pos += len(b)
        return b

    def readable(self) -> bool:
        return True

    def _walk(self, b: bytes) -> None:
        i, end = 0, len(b)
        while True:
            if self.skip:
                k = min(self.skip, end - i)
                self.skip -= k
                i += k
                if self.skip:
                    return
            need = _NEED[self.state]
            had = len(self.part)
            got = self.part + b[i:i + need - had] if had else b[i:i + need]
            if len(got) < need:
                self.part = got
                return
            i += need - had
            self.part = b""
            v = int.from_bytes(got, "little")
            if self.state == _BLOCK:
                # Last_Block bit, Block_Type (1: RLE, one byte of content), Block_Size.
                self.skip = 1 if (v >> 1) & 3 == 1 else v >> 3
                if v & 1:
                    self.last = True
                    self.skip += 4 if self.checksum else 0
                    self.state = _MAGIC
            elif self.state == _MAGIC:
                self.last = False
                if v == _ZSTD_MAGIC:
                    self.state = _DESCRIPTOR
                    self.frames += 1
                elif v & ~0xF == _SKIPPABLE:
                    self.state = _SKIP_SIZE
                else:  # the decoder refuses it (or reads a legacy frame not checked here)
                    self.state = _UNKNOWN
                    self.unknown_at = self.pos + i - need
                    return
            elif self.state == _DESCRIPTOR:
                # The rest of the frame header: Window_Descriptor unless
                # Single_Segment, then Dictionary_ID and Frame_Content_Size.
                single = v >> 5 & 1
                self.checksum = bool(v & 4)
                self.skip = (1 - single) + (0, 1, 2, 4)[v & 3] + (single, 2, 4, 8)[v >> 6]
                self.state = _BLOCK
            else:
                self.skip = v
                self.state = _MAGIC

    def unfinished(self) -> str | None:
        """At the end of the input: None after a whole last frame, else where it ended."""
        if self.state == _MAGIC and not self.skip and not self.part and self.frames:
            return None
        if self.last and self.checksum and self.skip <= 4:
            return "inside its frame's content checksum"
        if self.last:
            return "inside its frame's last block"
        if self.state == _MAGIC and self.skip:
            return "inside a skippable frame"
        return "inside a frame, before its last block"
