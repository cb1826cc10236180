"""Writing safetensors checkpoints without holding them in memory: the one shard plan, header and
index used by the one-pass merge (tensors streamed in) and the stand-ins (a data section that is a
hole). The format: 8 bytes little-endian header length, the JSON header padded with spaces to 8
bytes, then each tensor's bytes at its `data_offsets`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

# bytes per element, by safetensors dtype name and by torch dtype name
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}

Entry = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(entry: Entry) -> int:
    return numel(entry[1]) * DTYPE_BYTES[entry[0]]


def plan_shards(entries: dict[str, Entry], shard_bytes: Optional[int]) -> list[list[str]]:
    """Names per file, in the given order (model order, as save_pretrained fills its shards): a new
    file starts where the next tensor would take this one past `shard_bytes`; None: one file."""
    if not shard_bytes:
        return [list(entries)]
    shards: list[list[str]] = [[]]
    size = 0
    for name, entry in entries.items():
        n = nbytes(entry)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def shard_file_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_header(f: BinaryIO, entries: dict[str, Entry], names: list[str], metadata: dict) -> int:
    """Write the length prefix and header of one file holding `names` in that order; returns the size
    of its data section."""
    header, offset = {}, 0
    for name in names:
        dtype, shape = entries[name]
        n = nbytes(entries[name])
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    f.write(struct.pack("<Q", len(raw)) + raw)
    return offset


def write_index(folder: Path, total: int, where: dict[str, str]) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": where}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
