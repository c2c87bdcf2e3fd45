"""Compressed encoders for serving and evaluation (``precision`` of the Predictor).

``int8``: dynamic quantization of every ``nn.Linear`` of the BERT encoder (attention and
feed-forward layers, int8 weights with one scale per output channel; the kind's small head stays
fp32: a one-output ranker head in int8 loses the ranking) with PyTorch's own
``torch.ao.quantization.quantize_dynamic``:
weights stored as int8, activations quantized per batch, CPU only (x86 / ARM kernels). Embedding
tables (word pieces, positions, item tokens) stay fp32, so item vectors of the item-token
retriever are exact and only the user encoder is approximated. Every encoder a model runs is
compressed (``encoder_owners``): the items ranker's frozen first stage as well as its copy. Scores stay close to fp32
(tests/model/test_compress.py bounds the difference; docs/benchmarks.md has the speed and the
NDCG@10 of both on MovieLens-100K).

``bf16`` / ``fp16``: the encoder's weights and activations in half precision (meant for GPUs, where
tensor cores run them several times faster than fp32; they run on CPU too, slower). Float inputs
(the item-token retriever's input embeddings) are cast on the way in and the hidden states come
out as fp32, so the heads, the item-vector table and every score after the encoder stay fp32.

``onnx`` / ``onnx-int8``: the encoder exported to ONNX and run by ONNX Runtime on the CPU, in fp32
or with ONNX Runtime's own int8 dynamic quantization (:mod:`recsys_ray.model.onnx_backend`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from recsys_ray.errors import RecsysError

PRECISIONS = ("fp32", "int8", "bf16", "fp16", "onnx", "onnx-int8")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compress(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """``model`` (a :class:`~recsys_ray.model.base.BertRecommender`) in ``precision`` (in place;
    returns it). fp32 changes nothing."""
    if precision not in PRECISIONS:
        raise RecsysError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return model
    if precision not in HALF and device.type != "cpu":
        raise RecsysError(f"precision {precision} runs on CPU only (device is {device}); use fp32, bf16 or fp16 on GPUs")
    if precision not in HALF and getattr(model, "lora_rank", None) is not None:
        raise RecsysError(f"precision {precision} needs plain weights: this checkpoint carries unmerged LoRA adapters")
    for owner in model.encoder_owners():  # every encoder the model runs (the items ranker: its first stage's as well)
        _compress_encoder(owner, precision)
        owner.precision = precision
    return model


def _compress_encoder(owner: nn.Module, precision: str) -> None:
    """Replace or convert ``owner.encoder`` for ``precision`` (not fp32; checked by :func:`compress`)."""
    if precision in HALF:
        half_encoder(owner.encoder, HALF[precision])
    elif precision.startswith("onnx"):
        from recsys_ray.model.onnx_backend import OrtEncoder

        owner.encoder = OrtEncoder(owner.encoder, quantize=precision == "onnx-int8")
    else:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch marks its quantized tensor constructors deprecated (still the API in 2.13)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # one int8 scale per output row, not per matrix: on the MiniLM retriever the full-catalogue
            # scores correlate 0.995 with fp32 instead of 0.978 (docs/benchmarks.md)
            quantize_dynamic(owner.encoder, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def half_encoder(encoder: nn.Module, dtype: torch.dtype) -> None:
    """``encoder`` computes in ``dtype``: weights cast, float inputs cast in, hidden states out as fp32."""
    encoder.to(dtype)

    def cast_in(module, args, kwargs):
        def cast(v):
            return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def float_out(module, args, kwargs, output):
        output.last_hidden_state = output.last_hidden_state.float()
        return output

    encoder.register_forward_pre_hook(cast_in, with_kwargs=True)
    encoder.register_forward_hook(float_out, with_kwargs=True)
