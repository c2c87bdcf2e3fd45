"""What a checkpoint is: a directory, written once, read by training, evaluation and serving.

::

    checkpoint_.../
      model.safetensors         the model's whole state dict (LoRA adapters unmerged)
      config.json               the BERT config;  tokenizer files (vocab.txt, tokenizer.json, ...)
      recsys_ray.json           {"format_version", "model_config", "extra"}: extra = metrics, step,
                                epoch, loss, train config, data fingerprint, text-rendering config
      items.parquet             the catalogue it was trained on (ids, texts, token ids, train counts)
      train_state.safetensors   optimizer, scheduler and RNG tensors (resume)
      train_state.json          everything else of the training state, no pickle

The model files are written and read by the model itself (``save`` / ``from_checkpoint`` of
:mod:`recsys_ray.model.base`; :func:`recsys_ray.model.kinds.load_model` picks the kind); this
module holds the rest: the file names, the metadata, the pickle-free training state, and
:func:`resolve`, which turns what a user passes (a checkpoint, a Ray Train run folder, an
``s3://`` URI) into one local checkpoint directory.

Training state encoding: every tensor goes to ``train_state.safetensors`` under the dotted path
it had (``optimizer.state.0.exp_avg``, ``rng.torch``); ``train_state.json`` holds everything else
plus ``format_version``, ``torch_version`` and a ``save_id`` that the safetensors metadata repeats
(a pair from two different saves is refused). JSON cannot tell a tuple from a list, nor an int key
from a str key, and has no tensors, so values are encoded with three tagged forms, each an object
with exactly one key: ``{"__tensor__": key}``, ``{"__tuple__": [...]}`` (AdamW's ``betas``, the
state of ``random``) and ``{"__dict__": [[key, value], ...]}`` (the optimizer's
``{param_index: {...}}``). Nothing is pickled, so loading cannot run code; a value of any other
type is refused at save time with a ``TypeError``. RNG streams are the calling process's only: a
state written by rank 0 restores rank 0's streams.
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

from recsys_ray import storage
from recsys_ray.data.catalogue import CATALOGUE_FILE, Catalogue
from recsys_ray.errors import RecsysError, one_line
from recsys_ray.model.tokenizer import BERT_CONFIG_FILE
from recsys_ray.ray_compat import read_run_snapshot

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "recsys_ray.json"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
FORMAT_VERSION = 1  # of recsys_ray.json and of the training state
SCORE = "ndcg@10"  # the validation metric that ranks a run's checkpoints ("best")
# SCORE of a checkpoint written mid-epoch, before validation: below every validated one. Not -inf:
# Ray's snapshot JSON stores it as null, and a resumed run could then not sort its checkpoints.
UNVALIDATED_SCORE = -1.0

__all__ = ["CATALOGUE_FILE", "META_FILE", "WEIGHTS_FILE", "SCORE", "best_checkpoint", "resolve", "read_meta"]


# ---------------------------------------------------------------------------------------------
# metadata


def meta_text(model_config: dict, extra: dict | None) -> str:
    """The recsys_ray.json text; raises RecsysError when ``extra`` is not JSON (nothing written)."""
    meta = {"format_version": FORMAT_VERSION, "model_config": model_config, "extra": extra or {}}
    try:
        return json.dumps(meta, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise RecsysError(f"extra is not JSON-serialisable ({exc})") from None


def read_meta(path: str | os.PathLike) -> dict:
    """recsys_ray.json of a checkpoint: ``{"format_version", "model_config", "extra"}``."""
    file = Path(path) / META_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise RecsysError(f"{file}: not found") from None
    except (OSError, ValueError) as exc:
        raise RecsysError(f"{file}: unreadable ({one_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise RecsysError(f"{file}: unknown checkpoint format (expected format_version {FORMAT_VERSION})")
    return meta


def require_files(path: Path) -> None:
    """RecsysError unless ``path`` is a directory holding the model files of a checkpoint."""
    if not path.is_dir():
        raise RecsysError(f"checkpoint directory not found: {path}")
    for name in (WEIGHTS_FILE, BERT_CONFIG_FILE, META_FILE):
        if not (path / name).is_file():
            raise RecsysError(f"{path}: not a recsys_ray checkpoint (missing {name})")


def write_training_checkpoint(path: str | os.PathLike, model, tokenizer, extra: dict, optimizer, scheduler,
                              progress: dict, catalogue: Catalogue) -> Path:
    """Everything a resumable, servable checkpoint holds (the model writes its own files)."""
    path = Path(path)
    model.save(path, extra=extra, tokenizer=tokenizer)
    save_train_state(path, optimizer, scheduler, progress)
    catalogue.save(path / CATALOGUE_FILE)
    return path


# ---------------------------------------------------------------------------------------------
# which checkpoint a path means


def best_checkpoint(results: list[tuple[str, dict]]) -> tuple[str, dict] | None:
    """The best of ``(name, metrics)`` results by :data:`SCORE`, in Ray's list order.

    Ties go to the later entry, as in Ray's checkpoint manager (its list is sorted worst first,
    equal scores in report order); an unvalidated checkpoint (:data:`UNVALIDATED_SCORE`, or no
    score at all) loses to any validated one.
    """
    best, best_score = None, None
    for name, metrics in results:
        score = metrics.get(SCORE)
        score = float("-inf") if not isinstance(score, (int, float)) else float(score)
        if best is None or score >= best_score:
            best, best_score = (name, metrics), score
    return best


def locate(path: str) -> str:
    """The checkpoint a path means, where it is (a URI stays a URI): a checkpoint -> itself; a
    Ray Train run directory (``storage_path/name``) -> its best kept checkpoint by :data:`SCORE`."""
    path = str(path)
    if storage.is_remote(path):
        snapshot = read_run_snapshot(path)
        if snapshot is not None and snapshot["checkpoints"]:
            return storage.join(path, best_checkpoint(snapshot["checkpoints"])[0])
        return path
    return resolve(path)


def resolve(path: str) -> str:
    """A local checkpoint directory for what a user passed.

    A checkpoint directory -> itself; a Ray Train run directory (``storage_path/name``) -> its
    best kept checkpoint by :data:`SCORE`; an ``s3://`` checkpoint or run -> copied once to the
    local cache. A missing path comes back as it is (the loader names it).
    """
    path = str(path)
    if storage.is_remote(path):
        return storage.local_copy(locate(path), META_FILE, what="checkpoint")
    p = Path(path)
    if (p / WEIGHTS_FILE).is_file() or not p.is_dir():
        return str(p)
    snapshot = read_run_snapshot(str(p))
    if snapshot is not None:
        kept = [(name, m) for name, m in snapshot["checkpoints"] if (p / name).is_dir()]
        if kept:
            return str(p / best_checkpoint(kept)[0])
    found = sorted(d for d in p.glob("checkpoint_*") if (d / WEIGHTS_FILE).is_file())
    if not found:
        raise RecsysError(f"{path}: neither a checkpoint nor a run directory with checkpoints")
    return str(found[-1])


def latest_result(run_path: str) -> dict | None:
    """Metrics of the checkpoint a Ray Train run would resume from (its latest), with the
    checkpoint's path as ``checkpoint_path``; None for a run without one."""
    snapshot = read_run_snapshot(run_path)
    if snapshot is None or snapshot["latest"] is None:
        return None
    name, metrics = snapshot["latest"]
    return {**metrics, "checkpoint_path": storage.join(run_path, name)}


# ---------------------------------------------------------------------------------------------
# training state (resume without pickle)

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
        raise RecsysError(f"{json_file}: unreadable ({one_line(exc)})") from None
    try:
        with safe_open(str(tensor_file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise RecsysError(f"{tensor_file}: unreadable safetensors ({one_line(exc)})") from None

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
        raise RecsysError(f"{json_file}: malformed training state ({one_line(exc)})") from None
    if scheduler is not None and sched_state is None:
        raise RecsysError(f"{path}: no scheduler state was saved, but a scheduler was given")

    try:
        optimizer.load_state_dict(optim_state)
    except (KeyError, TypeError, ValueError) as exc:  # e.g. another model's parameter groups
        raise RecsysError(f"{path}: optimizer state does not fit this optimizer ({one_line(exc)})") from None
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    _set_rng_state(rng)
    if doc.get("torch_version") != torch.__version__:
        log.info("training state from torch %s loaded with torch %s", doc.get("torch_version"), torch.__version__)
    return progress


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
        log.warning("training state has %d CUDA RNG states, this process sees %d devices; "
                    "restoring the first %d", len(cuda), n_devices, min(len(cuda), n_devices))
    for index, state in enumerate(cuda[:n_devices]):
        torch.cuda.set_rng_state(state, index)
    np.random.set_state(np_state)
    random.setstate(py_state)


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


def _temp_name(directory: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=".train_state.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(name)


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())
