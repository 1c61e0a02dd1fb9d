"""Recipe state (optimizer, LR scheduler, dataloader position, RNG) as tensors + JSON, never a pickle.

``torch.load(weights_only=False)`` on a checkpoint executes whatever the file's pickle says, so a crafted
``recipe_state.pt`` runs code on resume. Here the Python values are encoded as JSON (tuples, non-string
dict keys, non-finite floats and bytes are tagged) and every tensor is stored in a flat list next to it::

    torch.save({"format": "kd-state-v1", "json": "<text>", "tensors": [t0, t1, ...]}, f)

which ``torch.load(f, weights_only=True)`` reads with no code execution (torch's restricted unpickler only
builds tensors, lists, dicts and strings). :func:`decode` rebuilds the exact original structure.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Tuple

import torch

FORMAT = "kd-state-v1"
_TAG = "__kd__"

__all__ = ["FORMAT", "encode", "decode", "pack", "unpack"]


def encode(obj: Any) -> Tuple[str, List[torch.Tensor]]:
    """(JSON text, tensors) for a tree of dicts/lists/tuples/tensors/scalars/str/bytes/None."""
    tensors: List[torch.Tensor] = []

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach().cpu() if x.device.type != "cpu" else x.detach())
            return {_TAG: "tensor", "i": len(tensors) - 1}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            return {_TAG: "float", "v": repr(x)}
        if isinstance(x, bytes):
            return {_TAG: "bytes", "hex": x.hex()}
        if isinstance(x, tuple):
            return {_TAG: "tuple", "items": [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and _TAG not in x:
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {_TAG: "dict", "items": [[enc(k, f"{path}<key>"), enc(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if isinstance(x, torch.dtype):
            return {_TAG: "dtype", "v": str(x).replace("torch.", "")}
        raise TypeError(f"cannot store {type(x).__name__} at {path or '<root>'} in a checkpoint (tensors, "
                        "numbers, strings, lists, tuples and dicts only)")

    return json.dumps(enc(obj, "")), tensors


def decode(text: str, tensors: List[torch.Tensor]) -> Any:
    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            tag = x.get(_TAG)
            if tag is None:
                return {k: dec(v) for k, v in x.items()}
            if tag == "tensor":
                return tensors[int(x["i"])]
            if tag == "float":
                return float(x["v"])
            if tag == "bytes":
                return bytes.fromhex(x["hex"])
            if tag == "tuple":
                return tuple(dec(v) for v in x["items"])
            if tag == "dict":
                return {_hashable(dec(k)): dec(v) for k, v in x["items"]}
            if tag == "dtype":
                return getattr(torch, x["v"])
            raise ValueError(f"unknown tag {tag!r} in recipe state")
        return x

    return dec(json.loads(text))


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def pack(obj: Any) -> Dict[str, Any]:
    """The object to ``torch.save``: only a format string, a JSON string and a list of tensors."""
    text, tensors = encode(obj)
    return {"format": FORMAT, "json": text, "tensors": tensors}


def unpack(blob: Any) -> Any:
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} recipe state")
    return decode(blob["json"], list(blob["tensors"]))
