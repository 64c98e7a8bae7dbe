"""Reading and writing safetensors checkpoints one byte range at a time.

The ``safetensors`` library memory-maps whole files: every page a merge touches then counts
in the process's resident memory until the handle closes, so streaming T + 1 checkpoints of a
7B model through it makes the process look (and, under memory limits, behave) as if it held
them all. Here a checkpoint is read with ``pread`` into tensors of exactly the requested
range, so resident memory stays at the chunk being merged; and a merged model is written
tensor by tensor with a header computed up front (shapes and dtypes are known before any
data), so nothing larger than one chunk is ever held. The format is the documented one: an
8-byte little-endian header length, a JSON header (``dtype``, ``shape``, ``data_offsets``
relative to the end of the header, optional ``__metadata__``), then the raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkfile import read_checked_header, read_checked_index

__all__ = ["TensorInfo", "SafetensorsCheckpoint", "load_checkpoint", "write_safetensors", "plan_shards", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file``, ``dtype``, ``shape`` and its byte offset in the file."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``(key -> TensorInfo, metadata)`` of one ``.safetensors`` file (reads only the header, checked
    by :func:`~map_merge.task_vectors.checkfile.read_checked_header`)."""
    length, entries, metadata = read_checked_header(path)
    start = 8 + length
    out: dict[str, TensorInfo] = {}
    for key, entry in entries.items():
        if entry.dtype not in DTYPES:
            raise ValueError(f"tensor {key!r} in {path} has dtype {entry.dtype}, which map_merge cannot read")
        out[key] = TensorInfo(key, path, DTYPES[entry.dtype], entry.shape, start + entry.begin)
    return out, metadata


class SafetensorsCheckpoint:
    """A model's weights on disk: one ``.safetensors`` file, or a folder of shards (with or
    without ``model.safetensors.index.json``). Only headers are read at construction.

    Attributes:
        path: the file or folder given.  files: the shard files.  tensors: ``key -> TensorInfo``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().resolve()  # once: a later os.chdir changes nothing, pickles carry it whole
        if not self.path.exists():
            raise FileNotFoundError(f"model path does not exist: {self.path}")
        if self.path.is_dir():
            index = self.path / "model.safetensors.index.json"
            if index.exists():
                weight_map = read_checked_index(index)
                by_file: dict[str, list[str]] = {}
                for key, name in weight_map.items():
                    by_file.setdefault(name, []).append(key)
                files = []
                for name, keys in by_file.items():
                    shard = self.path / name
                    if not shard.exists():
                        raise FileNotFoundError(f"shard {shard} (holding {keys[0]!r} and {len(keys) - 1} more) listed in {index} does not exist")
                    files.append(shard)
            else:
                files = sorted(self.path.glob("*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"no *.safetensors weights in model folder {self.path}")
                weight_map = None
        else:
            files = [self.path]
            weight_map = None
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            header, metadata = read_header(file)
            self.metadata.update(metadata)
            for key, info in header.items():
                if key in self.tensors:
                    raise ValueError(f"tensor {key!r} appears in two shards: {self.tensors[key].file.name} and {file.name}")
                if weight_map is not None and weight_map.get(key) != file.name:
                    continue  # a stale copy the index does not point to
                self.tensors[key] = info
        if weight_map is not None:
            absent = [k for k in weight_map if k not in self.tensors]
            if absent:
                raise ValueError(f"{self.path}: key {absent[0]!r} is mapped to shard {weight_map[absent[0]]} by the index but is not in that file")
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading
    def read(self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``key`` as a CPU tensor of its
        stored dtype (only those bytes are read): a new tensor, or a view of ``buffer`` (a uint8
        CPU tensor of at least that many bytes, reused by callers that read chunk after chunk)."""
        info = self.tensors[key]
        stop = info.numel if stop is None else stop
        if not 0 <= start <= stop <= info.numel:
            raise IndexError(f"range {start}..{stop} outside tensor {key!r} of {info.numel} elements")
        count = (stop - start) * info.itemsize
        out = torch.empty(count, dtype=torch.uint8) if buffer is None or buffer.numel() < count else buffer[:count]
        if count:
            fd = self._fd(info.file)
            view = memoryview(out.numpy())
            done = 0
            while done < count:
                got = os.preadv(fd, [view[done:]], info.offset + start * info.itemsize + done)
                if got <= 0:
                    raise OSError(f"unexpected end of file reading {key!r} from {info.file}")
                done += got
        return out.view(info.dtype) if info.dtype != torch.uint8 else out

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = os.open(file, os.O_RDONLY)
                    self._fds[file] = fd
        return fd

    def identity(self) -> list:
        """What identifies these files cheaply: names, sizes and modification times."""
        out = []
        for file in self.files:
            stat = file.stat()
            out.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
        return out

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __del__(self) -> None:  # pragma: no cover - best effort
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file or sharded folder, in its stored dtype and shape."""
    checkpoint = SafetensorsCheckpoint(path)
    try:
        return {key: checkpoint.read(key).view(info.shape) for key, info in checkpoint.tensors.items()}
    finally:
        checkpoint.close()

def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split keys (in order, with their byte sizes) into shards of at most ``max_shard_bytes``
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards if shards[0] else []


@contextlib.contextmanager
def _removed_on_error(path: Path | None) -> Iterator[None]:
    """Remove ``path`` (if given) when the block fails or is interrupted."""
    try:
        yield
    except BaseException:
        if path is not None and path.exists():
            path.unlink()
        raise


def write_safetensors(
    path: str | os.PathLike,
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    chunks: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    atomic: bool = True,
) -> int:
    """Write one ``.safetensors`` file whose tensors arrive as chunks.

    Args:
        entries: ``(key, dtype, shape)`` of every tensor, in file order.
        chunks: ``(key, tensor)`` pieces in the same order; each key's pieces, flattened and
            concatenated, are its tensor (dtype must match).
        atomic: write ``path.partial``, flush it to disk and rename it into place (removed on an
            error or interrupt); ``False``: write ``path`` itself (a temporary path the caller
            renames, as :func:`~map_merge.task_vectors.saving.atomic_path` does).
    Returns: bytes written.
    """
    header: dict[str, dict] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    expected: dict[str, tuple[torch.dtype, int]] = {}
    for key, dtype, shape in entries:
        numel = 1
        for s in shape:
            numel *= s
        size = numel * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        expected[key] = (dtype, size)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial") if atomic else path
    order = [key for key, _, _ in entries]
    written = dict.fromkeys(order, 0)
    position = 0  # index in order of the tensor being written
    with _removed_on_error(tmp if atomic else None), open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for key, tensor in chunks:
            # move on past finished tensors until the one this chunk belongs to
            while position < len(order) and order[position] != key and written[order[position]] == expected[order[position]][1]:
                position += 1
            if position >= len(order) or order[position] != key:
                raise ValueError(f"chunk for {key!r} arrives out of order")
            dtype, size = expected[key]
            if tensor.dtype != dtype:
                raise ValueError(f"chunk for {key!r} is {tensor.dtype}, expected {dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            nbytes = data.numel() * data.element_size()
            if written[key] + nbytes > size:
                raise ValueError(f"more data than its shape holds for {key!r}")
            if nbytes:
                handle.write(memoryview(data.view(torch.uint8).numpy()))
            written[key] += nbytes
        short = [k for k in order if written[k] != expected[k][1]]
        if short:
            raise ValueError(f"incomplete data for tensor {short[0]!r} ({written[short[0]]} of {expected[short[0]][1]} bytes)")
        if atomic:
            handle.flush()
            os.fsync(handle.fileno())
    if atomic:
        os.replace(tmp, path)
    return 8 + len(raw) + offset
