"""Safetensors files at the byte level: a validating reader and an atomic writer.

The format is 8 bytes (little-endian u64 ``N``), ``N`` bytes of JSON header (an object: an
optional ``"__metadata__"`` of string values, and one entry per tensor with ``dtype``,
``shape`` and ``data_offsets`` relative to the end of the header), then the tensor bytes.

The reader trusts nothing: the header size is capped, every entry is checked (known dtype,
shape of non-negative integers, offsets inside the file, byte count equal to
``numel * itemsize``, no overlaps, no duplicate names), and every problem is a
:class:`~paramshare.errors.CheckpointError` naming the file. Tensors are views of a private
memory map of the file, so opening a large file costs no copy. Nothing is ever unpickled.

The writer lays tensors out by descending element size, then name (each tensor stays
aligned, and the layout is the one ``safetensors`` itself writes), pads the header to 8 bytes, and writes atomically: a temporary
file in the target folder, flushed and fsynced, then renamed over the target. An error
mid-write leaves an existing file untouched and removes the temporary file; one left by a
crashed writer is removed by the next write to the same path.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = [
    "HEADER_CAP",
    "DTYPES",
    "dtype_code",
    "Entry",
    "SafetensorsFile",
    "open_file",
    "write_file",
    "tensor_bytes",
]

#: Largest header accepted (safetensors' own limit is 100 MB).
HEADER_CAP = 100_000_000
_MAX_DIMS = 64

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _code, _attr in (
    ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
_CODES = {v: k for k, v in DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    code = _CODES.get(dtype)
    if code is None:
        raise CheckpointError(f"dtype {dtype} cannot be stored in a safetensors file; convert it first (e.g. .float())")
    return code


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: where its bytes are and what they are."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.code]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return prod(self.shape)


class SafetensorsFile:
    """A validated safetensors file: its entries, its metadata and lazy tensor views.

    Use :func:`open_file`. ``tensor(name)`` returns a view of the file's bytes (a private
    copy-on-write memory map: writing to it never touches the file); ``tensor(name, copy=True)``
    an independent tensor.
    """

    def __init__(self, path: str, size: int, header_len: int, entries: dict[str, Entry], metadata: dict[str, str], buf):
        self.path = path
        self.size = size
        self.header_len = header_len
        self.data_start = 8 + header_len
        self.entries = entries
        self.metadata = metadata
        self._buf = buf

    @property
    def header_bytes(self) -> int:
        """Bytes before the tensor data (the 8-byte length and the JSON header)."""
        return self.data_start

    def raw(self, name: str) -> memoryview:
        """The bytes of one tensor (a read-only view; no copy)."""
        e = self.entries[name]
        mv = memoryview(self._buf)
        return mv[self.data_start + e.begin : self.data_start + e.end].toreadonly()

    def tensor(self, name: str, copy: bool = False) -> torch.Tensor:
        """The tensor called ``name``, shaped and typed as the header says."""
        e = self.entries[name]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        flat = torch.frombuffer(self._buf, dtype=torch.uint8, count=e.nbytes, offset=self.data_start + e.begin)
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        if copy or (self.data_start + e.begin) % itemsize:
            flat = flat.clone()
        t = flat.view(e.dtype).reshape(e.shape)
        if e.dtype == torch.bool and bool((flat > 1).any()):
            raise CheckpointError(f"{self.path}: tensor {name!r} is BOOL but holds bytes other than 0 and 1")
        return t


def _fail(path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"expected a file path (str or os.PathLike), got {type(path).__name__}")
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not p:
        raise CheckpointError("expected a file path, got an empty string")
    return p


def open_file(path, header_cap: int = HEADER_CAP) -> SafetensorsFile:
    """Open and validate a safetensors file; a CheckpointError names the file and the problem.

    Args:
        path: the file.
        header_cap: largest JSON header accepted, in bytes.

    Returns:
        A :class:`SafetensorsFile` (the data stays on disk, memory-mapped).

    Raises:
        CheckpointError: missing path, a directory, an unreadable, truncated or malformed file.
    """
    p = _check_path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise _fail(p, "no such file") from None
    except OSError as e:
        raise _fail(p, f"cannot access the file: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _fail(p, "is a directory, not a checkpoint file; name the .safetensors file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise _fail(p, "is not a regular file")
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _fail(p, f"is truncated or not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > header_cap:
                raise _fail(p, f"header length {n} exceeds the cap of {header_cap} bytes; the file is corrupt or not a safetensors file")
            if 8 + n > size:
                raise _fail(p, f"is truncated: the header says {n} bytes but only {size - 8} follow")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except CheckpointError:
        raise
    except OSError as e:
        raise _fail(p, f"cannot read the file: {e.strerror or e}") from None
    header = bytes(buf[8 : 8 + n])
    entries, metadata = _parse_header(p, header, size - 8 - n)
    return SafetensorsFile(p, size, n, entries, metadata, buf)


def _parse_header(p: str, header: bytes, data_len: int) -> tuple[dict[str, Entry], dict[str, str]]:
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(p, f"the header is not UTF-8 text (byte {e.start}); the file is corrupt or not a safetensors file") from None
    if not text.lstrip().startswith("{"):
        raise _fail(p, "the header is not a JSON object; the file is corrupt or not a safetensors file")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise _fail(p, "the header is nested too deeply to be a safetensors header") from None
    except ValueError as e:
        raise _fail(p, f"the header is not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(obj, dict):
        raise _fail(p, f"the header is a JSON {type(obj).__name__}, not an object")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(p, "the header's __metadata__ must map strings to strings")
    entries: dict[str, Entry] = {}
    for name, info in obj.items():
        entries[name] = _parse_entry(p, name, info, data_len)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(p, f"tensors {n0!r} (bytes {b0}-{e0}) and {n1!r} (bytes {b1}-{e1}) overlap; the header lies about offsets")
    return entries, metadata


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(p: str, name: str, info, data_len: int) -> Entry:
    if not isinstance(info, dict):
        raise _fail(p, f"header entry {name!r} is not an object")
    extra = set(info) - {"dtype", "shape", "data_offsets"}
    if extra or len(info) != 3:
        missing = {"dtype", "shape", "data_offsets"} - set(info)
        what = f"lacks {sorted(missing)}" if missing else f"has unknown fields {sorted(extra)}"
        raise _fail(p, f"header entry {name!r} {what}")
    code = info["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise _fail(p, f"tensor {name!r} has dtype {code!r}, which this reader does not know (known: {', '.join(DTYPES)})")
    shape = info["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_int(s) and s >= 0 for s in shape):
        raise _fail(p, f"tensor {name!r} has an invalid shape {shape!r}")
    offs = info["data_offsets"]
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
        raise _fail(p, f"tensor {name!r} has invalid data_offsets {offs!r}")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise _fail(p, f"tensor {name!r} claims bytes {begin}-{end}, outside the {data_len} data bytes of the file (truncated?)")
    itemsize = torch.empty((), dtype=DTYPES[code]).element_size()
    want = prod(shape) * itemsize
    if end - begin != want:
        raise _fail(
            p,
            f"tensor {name!r} is {code} of shape {tuple(shape)} ({want} bytes) but its offsets span {end - begin} bytes; "
            "the header lies about offsets or dtype",
        )
    return Entry(name, code, tuple(shape), begin, end)


# ---- writing --------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in row-major order, little-endian (a view when it is contiguous on CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _layout(items: list[tuple[str, torch.dtype, tuple[int, ...], object]]):
    """Data order: by descending element size (so each tensor stays aligned), then smallest first.

    Smallest first keeps the many small tensors (biases, norms) at short offsets, so their
    ``data_offsets`` take fewer digits: the header of a paramshare checkpoint, plan included,
    comes out smaller than safetensors' own for the same tensors (which orders by name).
    Ties are broken by name, so the layout is deterministic.
    """

    def key(it):
        size = torch.empty((), dtype=it[1]).element_size()
        return (-size, math.prod(it[2]) * size, it[0])

    return sorted(items, key=key)


def build_header(items, metadata: dict[str, str]) -> tuple[bytes, int]:
    """(padded header JSON, data bytes) for ``items`` = [(name, dtype, shape, nbytes)]."""
    head: dict[str, object] = {}
    if metadata:
        head["__metadata__"] = dict(metadata)
    off = 0
    for name, dtype, shape, nbytes in items:
        head[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, off


def write_file(path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (name, tensor) as a safetensors file at ``path``, atomically.

    Args:
        path: the target file (its folder must exist).
        tensors: names and tensors; names must be unique.
        metadata: string-to-string metadata stored in the header.

    Returns:
        The file size in bytes.

    Raises:
        CheckpointError: a bad path, a duplicate name, a dtype safetensors cannot store, an
            OS error while writing (an existing file at ``path`` is left intact).
    """
    p = _check_path(path)
    items = []
    seen = set()
    for name, t in tensors:
        if name in seen:
            raise CheckpointError(f"{p}: tensor name {name!r} appears twice")
        seen.add(name)
        dtype_code(t.dtype)
        items.append((name, t.dtype, tuple(t.shape), t))
    items = _layout(items)
    header, _ = build_header([(n, dt, s, t.numel() * t.element_size()) for n, dt, s, t in items], metadata or {})
    folder = os.path.dirname(os.path.abspath(p))
    if os.path.isdir(p):
        raise _fail(p, "is a directory; name a file to write, e.g. model.safetensors inside it")
    if not os.path.isdir(folder):
        raise _fail(p, f"the folder {folder!r} does not exist; create it first")
    if sys.byteorder != "little":  # pragma: no cover - no such machine to test on
        raise CheckpointError("writing safetensors files needs a little-endian machine")
    with _AtomicFile(p, folder) as f:
        f.write(memoryview(struct.pack("<Q", len(header)) + header))
        for _, _, _, t in items:
            f.write(tensor_bytes(t))
    return 8 + len(header) + sum(t.numel() * t.element_size() for *_, t in items)


def _writeback_starter():
    """``start(fd, offset, nbytes)``: ask the kernel to begin writing those bytes to disk now.

    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts write-back without waiting for
    it, so the disk works while the next chunk is copied and the final fsync has little left
    to do (about a quarter off a durable 90 MB save here). Elsewhere, or if libc lacks the
    call, a no-op: the fsync at the end does all the work, as before.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - a libc without sync_file_range
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # 2 = SYNC_FILE_RANGE_WRITE


_START_WRITEBACK = _writeback_starter()
_CHUNK = 4 << 20  # bytes written (and handed to write-back) at a time


class _AtomicFile:
    """A file that appears at ``path`` only when fully written and synced.

    The bytes go to ``.<name>.paramshare-<pid>-<random>.tmp`` in the target's folder, which is
    flushed, fsynced and renamed over ``path``; on an error it is removed. A temporary file
    left by a writer that crashed (its process is gone) is removed by the next write to the
    same path. Writes go straight to the file (unbuffered) in chunks of 4 MiB, each handed to
    the kernel's write-back as soon as it is written, so syncing overlaps writing.
    """

    def __init__(self, path: str, folder: str):
        self.path = path
        self.folder = folder
        self.prefix = "." + Path(path).name + ".paramshare-"
        self.tmp_name: str | None = None
        self.file = None
        self.offset = 0

    def write(self, data: memoryview) -> None:
        """Write all of ``data`` (a byte memoryview) at the end of the temporary file."""
        f, fd = self.file, self.file.fileno()
        for start in range(0, len(data), _CHUNK):
            chunk = data[start : start + _CHUNK]
            done = 0
            while done < len(chunk):  # a raw write may write less than asked
                done += f.write(chunk[done:])
            if _START_WRITEBACK is not None:
                _START_WRITEBACK(fd, self.offset, len(chunk))
            self.offset += len(chunk)

    def _sweep(self) -> None:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for n in names:
            if not (n.startswith(self.prefix) and n.endswith(".tmp")):
                continue
            pid = n[len(self.prefix):].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            try:
                os.unlink(os.path.join(self.folder, n))
            except OSError:
                pass

    def __enter__(self):
        self._sweep()
        try:
            fd, self.tmp_name = tempfile.mkstemp(prefix=f"{self.prefix}{os.getpid()}-", suffix=".tmp", dir=self.folder)
            self.file = open(fd, "wb", buffering=0)
        except OSError as e:
            raise _fail(self.path, f"cannot create a file in {self.folder!r}: {e.strerror or e}") from None
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
                return False
        except OSError as e:
            self._discard()
            raise _fail(self.path, f"cannot write the file: {e.strerror or e}; any previous file there is unchanged") from None
        except BaseException:
            self._discard()
            raise
        self._discard()
        if isinstance(exc, OSError):
            raise _fail(self.path, f"cannot write the file: {exc.strerror or exc}; any previous file there is unchanged") from None
        return False

    def _commit(self) -> None:
        f = self.file
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(f.fileno(), 0o666 & ~umask)
        os.fsync(f.fileno())
        f.close()
        os.replace(self.tmp_name, self.path)
        self.tmp_name = None
        try:
            dfd = os.open(self.folder, os.O_RDONLY)
        except OSError:  # pragma: no cover - folders that cannot be opened cannot be synced
            return
        try:
            os.fsync(dfd)
        except OSError:  # pragma: no cover - some file systems refuse to sync folders
            pass
        finally:
            os.close(dfd)

    def _discard(self) -> None:
        try:
            if self.file is not None and not self.file.closed:
                self.file.close()
        except OSError:
            pass
        if self.tmp_name is not None:
            try:
                os.unlink(self.tmp_name)
            except OSError:
                pass
            self.tmp_name = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True
