"""Training state for resume, without pickle: optimizer, LR scheduler, RNG streams, progress.

A state is a directory holding two files, written by :func:`save_train_state`:

- ``train_state.safetensors``: every tensor, under the dotted path it had in the state, e.g.
  ``optimizer.state.0.exp_avg``, ``optimizer.state.0.step``, ``rng.torch``, ``rng.cuda.0``.
- ``train_state.json``: everything else, plus ``format_version``, ``torch_version`` and a
  ``save_id`` that the safetensors metadata repeats (a pair from two different saves is refused).

JSON cannot tell a tuple from a list, nor an int key from a str key, and has no tensors, so values
are encoded with three tagged forms, each an object with exactly one key:
``{"__tensor__": "<safetensors key>"}``, ``{"__tuple__": [...]}`` (AdamW's ``betas``, the state of
``random``) and ``{"__dict__": [[key, value], ...]}`` (the optimizer's ``{param_index: {...}}``).
Nothing is pickled, so loading a state cannot run code; the price is that a value of any other
type (a callable object inside a scheduler, say) is refused at save time with a ``TypeError``.

The RNG streams are those of the calling process only; in data-parallel training every rank has
its own, so a state written by rank 0 restores rank 0's streams.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recsys_ray.errors import RecsysError

logger = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
FORMAT_VERSION = 1

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_TAGS = (_TENSOR, _TUPLE, _DICT)
_SAVE_ID = "save_id"  # safetensors metadata key, repeated in the JSON


def save_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                     progress: dict) -> None:
    """Write optimizer, scheduler, RNG states and ``progress`` into the directory ``path``.

    ``progress`` is the caller's position, e.g. ``{"global_step": 120, "epoch": 1,
    "step_in_epoch": 20}``; JSON values (tuples and tensors too) come back unchanged.
    The directory is created if needed; each file is replaced atomically.
    """
    if not isinstance(progress, dict):
        raise TypeError(f"progress must be a dict, not {type(progress).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    doc = {
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        _SAVE_ID: uuid.uuid4().hex,
        "progress": _encode(progress, "progress", tensors),
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), "scheduler", tensors),
        "rng": _encode(_rng_state(), "rng", tensors),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # tensors first: a crash between the two replaces leaves a mismatched save_id, refused on load
    tmp_tensors = _temp_name(path)
    tmp_json = _temp_name(path)
    try:
        save_file(tensors, str(tmp_tensors), metadata={_SAVE_ID: doc[_SAVE_ID]})
        _fsync(tmp_tensors)
        with open(tmp_json, "w") as f:
            json.dump(doc, f, indent=1)  # floats are written with repr(): they read back exactly
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_tensors, path / STATE_TENSORS)
        os.replace(tmp_json, path / STATE_JSON)
    finally:
        tmp_tensors.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)


def load_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> dict:
    """Restore what :func:`save_train_state` wrote, in place; return the saved ``progress``.

    Optimizer state tensors move to their parameters' device and float dtype
    (``Optimizer.load_state_dict`` does it; AdamW's ``step`` stays on CPU unless fused/capturable).
    Everything is read and checked before anything is changed. ``scheduler=None`` skips the saved
    scheduler state. Raises :class:`RecsysError` for a missing, corrupt or mismatched state.
    """
    path = Path(path)
    if not path.is_dir():
        raise RecsysError(f"training state directory not found: {path}")
    json_file, tensor_file = path / STATE_JSON, path / STATE_TENSORS
    for file in (json_file, tensor_file):
        if not file.is_file():
            raise RecsysError(f"{path}: not a training state (missing {file.name})")
    try:
        doc = json.loads(json_file.read_text())
    except (OSError, ValueError) as exc:
        raise RecsysError(f"{json_file}: unreadable ({_one_line(exc)})") from None
    try:
        with safe_open(str(tensor_file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise RecsysError(f"{tensor_file}: unreadable safetensors ({_one_line(exc)})") from None

    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        found = doc.get("format_version") if isinstance(doc, dict) else None
        raise RecsysError(f"{json_file}: unsupported format_version {found!r} (expected {FORMAT_VERSION})")
    if meta.get(_SAVE_ID) != doc.get(_SAVE_ID):
        raise RecsysError(f"{path}: {STATE_JSON} and {STATE_TENSORS} come from different saves")
    try:
        progress = _decode(doc["progress"], tensors)
        optim_state = _decode(doc["optimizer"], tensors)
        sched_state = _decode(doc["scheduler"], tensors)
        rng = _parse_rng(_decode(doc["rng"], tensors))
    except (KeyError, TypeError, ValueError) as exc:
        raise RecsysError(f"{json_file}: malformed training state ({_one_line(exc)})") from None
    if scheduler is not None and sched_state is None:
        raise RecsysError(f"{path}: no scheduler state was saved, but a scheduler was given")

    try:
        optimizer.load_state_dict(optim_state)
    except (KeyError, TypeError, ValueError) as exc:  # e.g. another model's parameter groups
        raise RecsysError(f"{path}: optimizer state does not fit this optimizer ({_one_line(exc)})") from None
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    _set_rng_state(rng)
    if doc.get("torch_version") != torch.__version__:
        logger.info("training state from torch %s loaded with torch %s",
                    doc.get("torch_version"), torch.__version__)
    return progress


# ---------------------------------------------------------------------------------------------
# RNG streams


def _rng_state() -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        # initialises CUDA on every visible device; a Ray GPU worker sees only its own
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_name, "keys": np_keys.tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
    }


def _parse_rng(rng: dict) -> tuple[torch.Tensor, list[torch.Tensor], tuple, tuple]:
    """The saved streams in the form their setters take, checked before anything is restored."""
    torch_state, cuda = rng["torch"], list(rng["cuda"])
    for state in [torch_state, *cuda]:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise TypeError("RNG states must be uint8 tensors")
    np_state = rng["numpy"]
    np_tuple = (str(np_state["bit_generator"]), np.asarray(np_state["keys"], dtype=np.uint32),
                int(np_state["pos"]), int(np_state["has_gauss"]), float(np_state["cached_gaussian"]))
    version, internal, gauss_next = rng["python"]
    return torch_state, cuda, np_tuple, (version, tuple(internal), gauss_next)


def _set_rng_state(rng: tuple[torch.Tensor, list[torch.Tensor], tuple, tuple]) -> None:
    torch_state, cuda, np_state, py_state = rng
    torch.set_rng_state(torch_state)
    n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and len(cuda) != n_devices:
        logger.warning("training state has %d CUDA RNG states, this process sees %d devices; "
                       "restoring the first %d", len(cuda), n_devices, min(len(cuda), n_devices))
    for index, state in enumerate(cuda[:n_devices]):
        torch.cuda.set_rng_state(state, index)
    np.random.set_state(np_state)
    random.setstate(py_state)


# ---------------------------------------------------------------------------------------------
# JSON + safetensors encoding


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``value``; its tensors go to ``tensors`` under dotted keys from ``key``."""
    if isinstance(value, torch.Tensor):
        name, n = key, 1
        while name in tensors:  # only if a dict key itself contains a dot
            name, n = f"{key}#{n}", n + 1
        value = value.detach()
        # own contiguous CPU copy: safetensors refuses views and tensors that share storage
        # (costs one copy of the optimizer state in host memory while saving)
        if value.device.type == "cpu":
            tensors[name] = value.clone(memory_format=torch.contiguous_format)
        else:
            tensors[name] = value.to("cpu").contiguous()
        return {_TENSOR: name}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
        for k in value:
            if k is not None and not isinstance(k, bool | int | float | str):
                raise TypeError(f"{key}: cannot store a {type(k).__name__} dict key without pickle")
        return {_DICT: [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, np.generic):  # e.g. a numpy float in progress
        return value.item()
    raise TypeError(f"{key}: cannot store a {type(value).__name__} without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        tag, inner = next(iter(value.items()))
        if tag == _TENSOR:
            if inner not in tensors:
                raise KeyError(f"tensor {inner!r} is not in {STATE_TENSORS}")
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == _DICT:
            return {k: _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


# ---------------------------------------------------------------------------------------------
# files


def _temp_name(directory: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=".train_state.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(name)


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
