"""safetensors read and write over numpy, tensor by tensor.

We read with our own memory-mapped reader because safetensors' numpy binding cannot return
bfloat16 (numpy has no such dtype); ml_dtypes supplies it here. We write with a streaming
writer: the header is known up front (every output shape and dtype is), so each tensor goes to
disk as soon as it is computed and peak memory stays at one tensor, not one shard.
The format: 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data section),
optional "__metadata__" of str -> str, then the raw little-endian data.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from pissa.errors import PissaError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
    "U32": np.dtype("<u4"), "U16": np.dtype("<u2"),
}
CODES = {v: k for k, v in DTYPES.items()}
class SafetensorsFile:
    """A memory-mapped safetensors file: header parsed and checked, tensors read on demand.

    Raises:
        PissaError: when the file is truncated, corrupt or uses an unknown dtype.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 100_000_000:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise PissaError(f"{self.path} is not a readable safetensors file ({e}); "
                             "re-download or re-export it") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._info = header
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise PissaError(f"{self.path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            want = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
            if end - begin != want or self._start + end > size:
                raise PissaError(f"{self.path} is truncated or corrupt (tensor {name} runs past the end "
                                 f"of the file or has the wrong size); re-download or re-export it")
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._info[name]["dtype"]

    def release(self) -> None:
        """Drop the file's pages this process has read from its resident memory (the OS keeps them
        in its page cache): a model read tensor by tensor then never counts whole against it."""
        release_pages(self._mm)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array (its stored dtype)."""
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self._info[name]
        begin, end = info["data_offsets"]
        raw = self._mm[self._start + begin: self._start + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def release_pages(array: np.memmap | None) -> None:
    """madvise(MADV_DONTNEED) on a read-only memory map, where the OS has it (Linux, macOS)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    handle = getattr(array, "_mmap", None)
    if advice is not None and handle is not None:
        handle.madvise(advice)


def layout(plan: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
           ) -> tuple[bytes, list[tuple[str, np.dtype, tuple[int, ...], int]]]:
    """A file's header bytes (length prefix included) and each tensor's (name, dtype, shape,
    absolute byte offset), for tensors stored in plan order. StreamWriter and PlacedFile both
    use it, so the same plan gives the same bytes whoever writes them and in whatever order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    entries = []
    for name, dtype, shape in plan:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        entries.append((name, dtype, tuple(shape), offset))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    head = struct.pack("<Q", len(blob)) + blob
    return head, [(n, d, shp, len(head) + o) for n, d, shp, o in entries]


# How much of a tensor a writer casts and writes at once: a tensor goes to disk without a whole copy
# of it, so a memory-mapped input stays in the page cache, where the kernel can drop it.
CHUNK_BYTES = 16 * 1024**2


def is_float(dtype: np.dtype) -> bool:
    """numpy's floating types and ml_dtypes' bfloat16 (which numpy does not count as floating)."""
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype) == DTYPES["BF16"]


def _check(want: tuple[str, np.dtype, tuple[int, ...]], name: str, array: np.ndarray) -> None:
    """The tensor written is the one declared: its name, its shape, and its dtype or a floating
    one to cast from."""
    want_name, dtype, shape = want
    castable = array.dtype == dtype or (is_float(array.dtype) and is_float(dtype))
    if name != want_name or not castable or tuple(array.shape) != shape:
        raise RuntimeError(f"writer expected {want_name} {dtype} {shape}, got {name} {array.dtype} {array.shape}")


def write_chunks(array: np.ndarray, dtype: np.dtype, write) -> None:
    """write(bytes) for each piece of `array` cast to `dtype`, at most CHUNK_BYTES of either at a
    time, one piece alive at once (a float cast goes through float32, as every cast in pissa does,
    so the values are those of a whole-array cast)."""
    flat = np.asarray(array).reshape(-1)  # a view for a contiguous array, memory-mapped ones included
    step = max(1, CHUNK_BYTES // max(flat.dtype.itemsize, np.dtype(dtype).itemsize, 4 if flat.dtype != dtype else 1))
    for i in range(0, flat.size, step):
        part = flat[i:i + step]
        if part.dtype != dtype:
            part = part.astype(np.float32, copy=False).astype(dtype, copy=False)
        write(np.ascontiguousarray(part).view(np.uint8).data)
        del part


class StreamWriter:
    """Writes one safetensors file whose tensors are declared up front and written in order.

    Args:
        path: the file to write.
        plan: (name, numpy dtype, shape) for each tensor, in the order they will be written.
        metadata: the optional "__metadata__" strings.
    """

    def __init__(self, path: str | Path, plan: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        head, entries = layout(plan, metadata)
        self._order = [(n, d, shp) for n, d, shp, _ in entries]
        self._f = open(self.path, "wb")
        self._f.write(head)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next declared tensor, cast to its declared dtype chunk by chunk."""
        want = self._order[self._next]
        _check(want, name, array)
        write_chunks(array, want[1], self._f.write)
        self._next += 1

    def close(self) -> None:
        missing = [n for n, _, _ in self._order[self._next:]]
        self._f.close()
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} declared tensors were never written, e.g. {missing[0]}")


class PlacedFile:
    """A safetensors file whose tensors are written in any order, each at its place, by any
    number of processes at once (pissa init across ranks). create() writes the header and sizes
    the file once; the result is byte for byte the file StreamWriter writes from the same plan."""

    def __init__(self, path: str | Path, plan: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        _, entries = layout(plan, metadata)
        self._where = {n: ((n, d, shp), offset) for n, d, shp, offset in entries}
        self._fd = os.open(self.path, os.O_WRONLY)

    @staticmethod
    def create(path: str | Path, plan: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
               metadata: Mapping[str, str] | None = None) -> None:
        head, entries = layout(plan, metadata)
        end = max((o + int(np.prod(shp, dtype=np.int64)) * d.itemsize for _, d, shp, o in entries), default=len(head))
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(end)

    def write(self, name: str, array: np.ndarray) -> None:
        want, offset = self._where[name]
        _check(want, name, array)
        at = [offset]

        def pwrite(part) -> None:
            data = memoryview(part)
            while len(data):  # pwrite may write less than asked (Linux: at most about 2 GiB per call)
                n = os.pwrite(self._fd, data, at[0])
                data, at[0] = data[n:], at[0] + n

        write_chunks(array, want[1], pwrite)

    def close(self) -> None:
        os.close(self._fd)


def save(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a dict of numpy arrays (bfloat16 included) as one safetensors file, sorted by name."""
    names = sorted(tensors)
    w = StreamWriter(path, [(n, tensors[n].dtype, tensors[n].shape) for n in names], metadata)
    for n in names:
        w.write(n, tensors[n])
    w.close()


def load(path: str | Path) -> dict[str, np.ndarray]:
    """Read a whole safetensors file into memory as numpy arrays (copies, not memory maps)."""
    f = SafetensorsFile(path)
    return {n: np.array(f.get(n)) for n in f.keys()}
