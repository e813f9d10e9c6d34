"""Split a nested training state into tensors and a JSON skeleton that restores the exact tree.

The skeleton is plain JSON (no NaN literals). JSON's own types stand for themselves: ``str``,
``int``, finite ``float``, ``bool``, ``None``, ``list`` and ``dict`` with ``str`` keys. Everything else
is an object tagged ``{"__t__": kind, ...}``: tensors (by name), NumPy arrays (a tensor plus the NumPy
dtype) and scalars, non-finite floats, tuples, ``torch.Size``, dicts with other keys (``int``, ...)
or with a key named ``__t__``, ``OrderedDict`` (with the ``_metadata`` that ``nn.Module.state_dict``
attaches), ``torch.dtype``, ``torch.device``, paths and bytes. Types are matched exactly, so a
subclass (a ``defaultdict``, a named tuple) is refused rather than silently restored as its base.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import pathlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

TAG = "__t__"

# torch dtype <-> safetensors dtype code; the file format stores exactly these.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
DTYPES_BY_CODE: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
_NUMPY_KINDS = "biufc"  # bool, signed, unsigned, float, complex: the kinds a tensor can hold
_SCALAR_KINDS = "biufcUS"
_PATH_TYPES = {cls.__name__: cls for cls in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path)}
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class CheckpointFormatError(ValueError):
    """A state this format cannot store, or a file that is not a valid, intact checkpoint."""


def format_key_path(path: tuple[Any, ...]) -> str:
    """``('callbacks', 'Foo', 0)`` -> ``state['callbacks']['Foo'][0]``."""
    return "state" + "".join(f"[{key!r}]" for key in path)


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``state`` into named tensors and a JSON-safe skeleton.

    Tensors are not copied. The same tensor (or the same view of one storage) met twice is stored once
    and both places refer to it; other views and non-contiguous tensors are stored as their own data.

    Raises:
        CheckpointFormatError: for a value that cannot be stored, naming its key path, e.g.
            ``state['callbacks']['Foo']['fn']: cannot store value of type function``.
    """
    flattener = _Flattener()
    skeleton = flattener.encode(state, ())
    return flattener.tensors, skeleton


def unflatten_state(tensors: Mapping[str, Any], skeleton: Any) -> Any:
    """Rebuild the tree :func:`flatten_state` split; ``tensors`` maps names to tensors (or placeholders).

    A placeholder that is a dataclass with a ``kind`` field gets ``kind="ndarray"`` where it stands
    for a NumPy array.

    Raises:
        CheckpointFormatError: if the skeleton is malformed or names a tensor that is missing.
    """
    return _decode(skeleton, (), tensors)


class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._names_by_view: dict[tuple[Any, ...], str] = {}

    def encode(self, value: Any, path: tuple[Any, ...]) -> Any:
        encoder = _ENCODERS.get(type(value))
        if encoder is not None:
            return encoder(self, value, path)
        if isinstance(value, torch.Tensor):  # nn.Parameter and friends: stored as plain tensors
            return {TAG: "tensor", "name": self.add_tensor(value, path)}
        if isinstance(value, pathlib.PurePath):
            kind = type(value).__name__ if type(value).__name__ in _PATH_TYPES else "Path"
            return {TAG: "path", "cls": kind, "v": str(value)}
        if isinstance(value, np.generic):
            return self._encode_numpy_scalar(value, path)
        raise CheckpointFormatError(
            f"{format_key_path(path)}: cannot store value of type {type(value).__name__}"
        )

    def add_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> str:
        where = format_key_path(path)
        if tensor.layout != torch.strided or tensor.is_meta:
            raise CheckpointFormatError(f"{where}: cannot store a {tensor.layout} tensor on {tensor.device}")
        if tensor.dtype not in DTYPE_CODES:
            raise CheckpointFormatError(f"{where}: cannot store a tensor of dtype {tensor.dtype}")
        view = None
        if tensor.numel() > 0:
            storage = tensor.untyped_storage().data_ptr(), tensor.storage_offset()
            view = (tensor.device, *storage, tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if view in self._names_by_view:
                return self._names_by_view[view]
        name = _unique_name(".".join(str(key) for key in path) or "state", self.tensors)
        self.tensors[name] = tensor.detach()
        if view is not None:
            self._names_by_view[view] = name
        return name

    def _encode_numpy_scalar(self, value: np.generic, path: tuple[Any, ...]) -> Any:
        if value.dtype.kind not in _SCALAR_KINDS:
            raise CheckpointFormatError(
                f"{format_key_path(path)}: cannot store NumPy scalar of dtype {value.dtype}"
            )
        return {TAG: "npscalar", "dtype": value.dtype.str, "v": self.encode(value.item(), path)}


def _unique_name(base: str, taken: Mapping[str, Any]) -> str:
    name, n = base, 1
    while name in taken or name == "__metadata__":
        n += 1
        name = f"{base}#{n}"
    return name


def _encode_float(_: _Flattener, value: float, path: tuple[Any, ...]) -> Any:
    if math.isfinite(value):
        return value
    return {TAG: "float", "v": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _encode_dict(flattener: _Flattener, value: dict[Any, Any], path: tuple[Any, ...]) -> Any:
    if TAG not in value and all(type(key) is str for key in value):
        return {key: flattener.encode(item, (*path, key)) for key, item in value.items()}
    return {TAG: "dict", "items": _encode_items(flattener, value, path)}


def _encode_ordered_dict(flattener: _Flattener, value: OrderedDict[Any, Any], path: tuple[Any, ...]) -> Any:
    node: dict[str, Any] = {TAG: "odict", "items": _encode_items(flattener, value, path)}
    metadata = getattr(value, "_metadata", None)
    if metadata is not None:
        node["meta"] = flattener.encode(metadata, (*path, "_metadata"))
    return node


def _encode_items(flattener: _Flattener, value: Mapping[Any, Any], path: tuple[Any, ...]) -> list[Any]:
    return [
        [flattener.encode(key, (*path, key)), flattener.encode(item, (*path, key))]
        for key, item in value.items()
    ]


def _encode_ndarray(flattener: _Flattener, value: np.ndarray, path: tuple[Any, ...]) -> Any:
    where = format_key_path(path)
    if value.dtype.kind not in _NUMPY_KINDS or not value.dtype.isnative:
        raise CheckpointFormatError(f"{where}: cannot store NumPy array of dtype {value.dtype}")
    try:
        tensor = torch.from_numpy(value if value.flags.c_contiguous else value.copy(order="C"))
    except TypeError as err:
        raise CheckpointFormatError(
            f"{where}: cannot store NumPy array of dtype {value.dtype}: {err}"
        ) from err
    return {TAG: "ndarray", "name": flattener.add_tensor(tensor, path), "dtype": value.dtype.str}


_ENCODERS: dict[type, Callable[[_Flattener, Any, tuple[Any, ...]], Any]] = {
    type(None): lambda f, v, p: v,
    bool: lambda f, v, p: v,
    int: lambda f, v, p: v,
    str: lambda f, v, p: v,
    float: _encode_float,
    list: lambda f, v, p: [f.encode(item, (*p, i)) for i, item in enumerate(v)],
    tuple: lambda f, v, p: {TAG: "tuple", "items": [f.encode(item, (*p, i)) for i, item in enumerate(v)]},
    torch.Size: lambda f, v, p: {TAG: "size", "items": list(v)},
    dict: _encode_dict,
    OrderedDict: _encode_ordered_dict,
    np.ndarray: _encode_ndarray,
    torch.dtype: lambda f, v, p: {TAG: "dtype", "v": str(v).removeprefix("torch.")},
    torch.device: lambda f, v, p: {TAG: "device", "v": str(v)},
    bytes: lambda f, v, p: {TAG: "bytes", "v": base64.b64encode(v).decode("ascii")},
}


def _decode(node: Any, path: tuple[Any, ...], tensors: Mapping[str, Any]) -> Any:
    if isinstance(node, list):
        return [_decode(item, (*path, i), tensors) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if TAG not in node:
        return {key: _decode(item, (*path, key), tensors) for key, item in node.items()}
    decoder = _DECODERS.get(node[TAG])
    if decoder is None:
        raise CheckpointFormatError(f"{format_key_path(path)}: unknown skeleton tag {node[TAG]!r}")
    try:
        return decoder(node, path, tensors)
    except CheckpointFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise CheckpointFormatError(
            f"{format_key_path(path)}: malformed {node[TAG]!r} entry: {err!r}"
        ) from err


def _decode_items(
    node: dict[str, Any], path: tuple[Any, ...], tensors: Mapping[str, Any]
) -> list[tuple[Any, Any]]:
    pairs = []
    for raw_key, raw_item in node["items"]:
        key = _decode(raw_key, path, tensors)
        pairs.append((key, _decode(raw_item, (*path, key), tensors)))
    return pairs


def _decode_ordered_dict(node: dict[str, Any], path: tuple[Any, ...], tensors: Mapping[str, Any]) -> Any:
    value = OrderedDict(_decode_items(node, path, tensors))
    if "meta" in node:
        value._metadata = _decode(node["meta"], (*path, "_metadata"), tensors)  # type: ignore[attr-defined]
    return value


def _tensor(node: dict[str, Any], path: tuple[Any, ...], tensors: Mapping[str, Any]) -> Any:
    if node["name"] not in tensors:
        raise CheckpointFormatError(
            f"{format_key_path(path)}: tensor {node['name']!r} is missing from the file"
        )
    return tensors[node["name"]]


def _decode_ndarray(node: dict[str, Any], path: tuple[Any, ...], tensors: Mapping[str, Any]) -> Any:
    tensor = _tensor(node, path, tensors)
    if not isinstance(tensor, torch.Tensor):  # a header-only placeholder; say it stands for an array
        return dataclasses.replace(tensor, kind="ndarray") if hasattr(tensor, "kind") else tensor
    array = tensor.cpu().numpy()
    if array.dtype != np.dtype(node["dtype"]):
        raise CheckpointFormatError(f"{format_key_path(path)}: array dtype {array.dtype} != {node['dtype']}")
    return array


def _decode_numpy_scalar(node: dict[str, Any], path: tuple[Any, ...], tensors: Mapping[str, Any]) -> Any:
    dtype = np.dtype(node["dtype"])
    if dtype.kind not in _SCALAR_KINDS:
        raise CheckpointFormatError(f"{format_key_path(path)}: NumPy scalar dtype {dtype} is not allowed")
    return dtype.type(_decode(node["v"], path, tensors))


def _decode_dtype(node: dict[str, Any], path: tuple[Any, ...], tensors: Mapping[str, Any]) -> Any:
    dtype = getattr(torch, node["v"], None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointFormatError(f"{format_key_path(path)}: unknown torch dtype {node['v']!r}")
    return dtype


_DECODERS: dict[str, Callable[[dict[str, Any], tuple[Any, ...], Mapping[str, Any]], Any]] = {
    "tensor": _tensor,
    "ndarray": _decode_ndarray,
    "npscalar": _decode_numpy_scalar,
    "float": lambda n, p, t: _NON_FINITE[n["v"]],
    "tuple": lambda n, p, t: tuple(_decode(item, (*p, i), t) for i, item in enumerate(n["items"])),
    "size": lambda n, p, t: torch.Size(int(i) for i in n["items"]),
    "dict": lambda n, p, t: dict(_decode_items(n, p, t)),
    "odict": _decode_ordered_dict,
    "dtype": _decode_dtype,
    "device": lambda n, p, t: torch.device(n["v"]),
    "path": lambda n, p, t: _PATH_TYPES[n["cls"]](n["v"]),
    "bytes": lambda n, p, t: base64.b64decode(n["v"], validate=True),
}
