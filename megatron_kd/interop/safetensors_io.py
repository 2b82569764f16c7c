"""Streaming safetensors reading and writing, one tensor in memory at a time.

``safetensors.safe_open`` memory-maps whole files, and every page it touches stays in the
process's resident set until the file is closed, so converting a one-file checkpoint would hold
the checkpoint twice (mapped file + model). Here tensors are read with plain ``readinto`` (page
cache, not RSS) straight into their destination when the dtype matches, and written from a
pre-computed header, so peak memory is the model plus the largest single tensor.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes
of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`` (offsets
relative to the end of the header), then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from megatron_kd.utils.io import atomic_write, read_json, write_json_atomic

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _read_exact(fh, view: memoryview) -> None:
    while view.nbytes:
        n = fh.readinto(view)
        if not n:
            raise ValueError(f"safetensors file {fh.name} is truncated: re-download or re-save it")
        view = view[n:]


class SafetensorsFile:
    """Lazy reader of one ``.safetensors`` file: the header is parsed, tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{self.path} is not a safetensors file (bad header)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            if e["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name} in {self.path} has unsupported dtype {e['dtype']}")

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        return DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape of ``name``."""
        return tuple(self.entries[name]["shape"])

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name``; read directly into ``out`` (same numel) when given, casting if needed."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype, shape = self.dtype(name), self.shape(name)
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise ValueError(f"tensor {name} in {self.path} has inconsistent size: the file is corrupt")
        if out is not None and out.numel() != numel:
            raise ValueError(f"tensor {name}: stored shape {shape} does not fit destination {tuple(out.shape)}")
        direct = out is not None and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        buf = out.detach() if direct else torch.empty(shape, dtype=dtype)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.data_start + begin)
            if numel:
                _read_exact(fh, memoryview(buf.view(-1).view(torch.uint8).numpy()))
        if out is None:
            return buf
        if not direct:
            with torch.no_grad():
                out.copy_(buf.view(out.shape))
        return out


class HFCheckpointReader:
    """The tensors of a HF model directory: ``model.safetensors`` or sharded with an index json."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        index = hf_dir / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, "safetensors index")["weight_map"]
        elif (hf_dir / SINGLE_NAME).is_file():
            weight_map = {k: SINGLE_NAME for k in SafetensorsFile(hf_dir / SINGLE_NAME).keys()}
        else:
            raise FileNotFoundError(f"{hf_dir} has no {SINGLE_NAME} or {INDEX_NAME}: only safetensors checkpoints "
                                    "are read (re-save with save_pretrained(..., safe_serialization=True))")
        self.files: dict[str, SafetensorsFile] = {}
        for fname in sorted(set(weight_map.values())):
            if not (hf_dir / fname).is_file():
                raise FileNotFoundError(f"{hf_dir / fname} named by {INDEX_NAME} is missing: re-download the model")
            self.files[fname] = SafetensorsFile(hf_dir / fname)
        self.weight_map = weight_map
        for name, fname in weight_map.items():
            if name not in self.files[fname].entries:
                raise ValueError(f"{INDEX_NAME} says {name} is in {fname}, but it is not: re-download the model")

    def keys(self) -> list[str]:
        """All tensor names."""
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape of ``name``."""
        return self.files[self.weight_map[name]].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        return self.files[self.weight_map[name]].dtype(name)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` (see :meth:`SafetensorsFile.read`)."""
        if name not in self.weight_map:
            raise KeyError(f"checkpoint has no tensor {name}")
        return self.files[self.weight_map[name]].read(name, out)

    def total_bytes(self) -> int:
        """Bytes of tensor data over all files."""
        return sum(self.shape_bytes(k) for k in self.weight_map)

    def shape_bytes(self, name: str) -> int:
        """Bytes of one tensor."""
        n = self.dtype(name).itemsize
        for s in self.shape(name):
            n *= s
        return n


@dataclass
class TensorSpec:
    """A tensor to write: its name, dtype, shape and a function producing it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    source: str = ""
    """Where it comes from (the megatron tensor name, for ordering); informational."""

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def write_safetensors(path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
    """Write ``specs`` to ``path`` (atomically), producing and writing one tensor at a time."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the reference writer does
    with atomic_write(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for s in specs:
            t = s.produce()
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise RuntimeError(f"{s.name}: produced {t.dtype}{tuple(t.shape)}, expected {s.dtype}{s.shape}")
            t = t.detach().cpu().contiguous()
            if t.numel():
                fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            del t


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5*10**9 bytes, ``"500MiB"`` -> 500*2**20, ``"1000"`` -> 1000 (HF's convention)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_hf_weights(out_dir: str | Path, specs: list[TensorSpec], max_shard_bytes: int,
                     on_tensor: Callable[[TensorSpec], None] | None = None) -> list[str]:
    """Write ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index json; file names."""
    out_dir = Path(out_dir)
    shards = plan_shards(specs, max_shard_bytes)
    if on_tensor is not None:
        for s in specs:
            s.produce = _notify(s.produce, s, on_tensor)
    if len(shards) == 1:
        write_safetensors(out_dir / SINGLE_NAME, shards[0])
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        write_safetensors(out_dir / fname, shard)
        weight_map.update({s.name: fname for s in shard})
    write_json_atomic(out_dir / INDEX_NAME, {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                                             "weight_map": weight_map})
    return names + [INDEX_NAME]


def _notify(produce: Callable[[], torch.Tensor], spec: TensorSpec, hook: Callable[[TensorSpec], None]):
    def wrapped() -> torch.Tensor:
        t = produce()
        hook(spec)
        return t
    return wrapped
