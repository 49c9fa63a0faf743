"""Write the safetensors format to an open file, streaming each tensor's own bytes.

``safetensors.*.save_file`` needs a path (which an atomic writer must not hand out) and
``safetensors.*.save`` builds the whole file in memory. This writer takes the bytes of each
tensor without a copy (a CPU tensor or array that is already contiguous is not copied at all) and
writes them through the file object :func:`emakit.io.atomic.atomic_write` gives. The same bytes
are what :func:`crc32` checksums, so a checksum costs one extra read of memory.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length, a
JSON header ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}`` padded
with spaces to a multiple of 8, then the tensors' bytes back to back. Tensors are laid out by
decreasing element size, so every tensor starts at an offset aligned to its element size.

Example:
    >>> import io, numpy as np, safetensors.numpy
    >>> buf = io.BytesIO()
    >>> raws = {"w": raw_bytes(np.arange(3, dtype=np.float32), "w")}
    >>> write_safetensors(buf, raws, {"k": "v"})
    >>> safetensors.numpy.load(buf.getvalue())["w"]
    array([0., 1., 2.], dtype=float32)
    >>> crc32(raws["w"].data)
    '30c8bc70'
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Mapping
from typing import IO, Any, NamedTuple

__all__ = ["CODES", "Raw", "crc32", "raw_bytes", "write_safetensors", "write_safetensors_lazily"]

CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
         "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
         "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
         "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
"""dtype name (torch or numpy) -> safetensors dtype code, for the dtypes emakit writes."""
_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
          "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class Raw(NamedTuple):
    """A tensor as the bytes safetensors stores: its dtype code, shape and data."""

    code: str
    shape: list[int]
    data: memoryview  # bytes ("B" format), little-endian, C order
    keep: Any = None  # the object that owns ``data`` (kept alive with it)


def _little_endian(flat: Any, size: int) -> Any:
    """A uint8 numpy view of little-endian bytes (a byte-swapped copy on big-endian hosts)."""
    if sys.byteorder == "big" and size > 1:  # pragma: no cover (no big-endian CI)
        return flat.view(f">u{size}").astype(f"<u{size}").view("u1")
    return flat


def raw_bytes(x: Any, name: str) -> Raw:
    """The bytes of a torch tensor or numpy array, without a copy where it is already laid out.

    Args:
        x: a dense torch tensor (any device; copied to the CPU) or a numpy array.
        name: the tensor's name, for errors.

    Raises:
        ValueError: a dtype safetensors cannot hold here, or a sparse or meta tensor.
        TypeError: ``x`` is neither a torch tensor nor a numpy array.
    """
    if type(x).__module__.startswith("torch"):
        import torch

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name!r}: expected a tensor, got {type(x).__name__}.")
        if x.layout != torch.strided or x.device.type == "meta":
            raise ValueError(f"{name!r}: a {x.layout} tensor on {x.device} has no data to "
                             "write; convert it with .to_dense() / give real values first.")
        dtype = str(x.dtype).removeprefix("torch.")
        code = CODES.get(dtype)
        if code is None:
            raise ValueError(f"{name!r}: dtype {dtype} cannot be written as safetensors by "
                             f"emakit; use one of {', '.join(CODES)}.")
        t = x.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        flat = t.reshape(-1).view(torch.uint8).numpy()
        return Raw(code, list(t.shape), memoryview(_little_endian(flat, _SIZES[code])), t)
    import numpy as np

    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name!r}: expected a torch tensor or a numpy array, got "
                        f"{type(x).__name__}.")
    code = CODES.get(x.dtype.name)
    if code is None or x.dtype.kind not in "biuf":
        raise ValueError(f"{name!r}: numpy dtype {x.dtype} cannot be written as safetensors; "
                         f"use one of {', '.join(k for k in CODES if hasattr(np, k))}.")
    a = np.ascontiguousarray(x).reshape(x.shape)  # a 0-d array stays 0-d
    data: Any
    if a.dtype.byteorder not in ("=", "|"):  # explicit byte order: store little-endian
        a = a.astype(a.dtype.newbyteorder("<"))
        data = a.reshape(-1).view(np.uint8)
    else:
        data = _little_endian(a.reshape(-1).view(np.uint8), a.dtype.itemsize)
    return Raw(code, list(a.shape), memoryview(data), a)


def crc32(data: memoryview) -> str:
    """The CRC-32 (``zlib.crc32``) of ``data`` as 8 hex digits; reads the memory, no copy."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def write_safetensors(f: IO[bytes], raws: Mapping[str, Raw],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``raws`` (by name) and ``metadata`` to the binary file ``f`` as safetensors.

    Raises:
        ValueError: a tensor named ``"__metadata__"`` (the format reserves it).
    """
    if "__metadata__" in raws:
        raise ValueError("a tensor may not be named '__metadata__' in a safetensors file; "
                         "rename it.")
    layout = {n: (r.code, r.shape) for n, r in raws.items()}
    f.write(_header_blob(layout, metadata))
    for name in _order(layout):
        f.write(raws[name].data)


def _order(layout: Mapping[str, tuple[str, list[int]]]) -> list[str]:
    return sorted(layout, key=lambda n: -_SIZES[layout[n][0]])  # stable: aligned offsets


def _header_blob(layout: Mapping[str, tuple[str, list[int]]],
                 metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the padded JSON header for tensors of ``layout`` (name -> code,
    shape), in :func:`_order`."""
    if "__metadata__" in layout:
        raise ValueError("a tensor may not be named '__metadata__' in a safetensors file; "
                         "rename it.")
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in _order(layout):
        code, shape = layout[name]
        end = offset + _SIZES[code] * _count(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def write_safetensors_lazily(f: IO[bytes] | None, layout: Mapping[str, tuple[str, list[int]]],
                             produce: Callable[[str], Raw | None],
                             metadata: Callable[[Mapping[str, str]], Mapping[str, str]]) -> None:
    """Write tensors one at a time as ``produce`` makes them (peak memory: one tensor).

    The header, which comes first, names every tensor's checksum, known only once the tensor
    is made: it is written with placeholders first and rewritten in place at the end (a
    checksum has a fixed width, so the header keeps its length). ``produce`` is called for
    every name in the same order on every caller, so it may run a collective (gathering a
    sharded tensor on every rank); only the caller with a file (``f``) writes.

    Args:
        f: a seekable binary file, or None on callers that only take part in ``produce``.
        layout: name -> (safetensors dtype code, shape) of every tensor.
        produce: name -> its :class:`Raw` (None on callers without a file).
        metadata: the checksums by name -> the header's metadata.

    Raises:
        ValueError: a produced tensor that does not match its layout, or a header whose
            length changed (a metadata function whose output depends on more than checksums
            of fixed width).
    """
    placeholder = dict.fromkeys(layout, "0" * 8)
    blob = _header_blob(layout, metadata(placeholder))
    if f is not None:
        start = f.tell()
        f.write(blob)
    sums: dict[str, str] = {}
    for name in _order(layout):
        raw = produce(name)
        if f is None or raw is None:
            continue
        if (raw.code, list(raw.shape)) != (layout[name][0], list(layout[name][1])):
            raise ValueError(f"{name!r}: produced {raw.code} {raw.shape}, the header says "
                             f"{layout[name][0]} {list(layout[name][1])}.")
        sums[name] = crc32(raw.data)
        f.write(raw.data)
    if f is None:
        return
    final = _header_blob(layout, metadata(sums))
    if len(final) != len(blob):
        raise ValueError("the header changed length while the tensors were written")
    end = f.tell()
    f.seek(start)
    f.write(final)
    f.seek(end)
