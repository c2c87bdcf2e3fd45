"""The BERT encoder run by ONNX Runtime (``precision`` ``onnx`` and ``onnx-int8`` of the Predictor).

:class:`OrtEncoder` replaces a model kind's Hugging Face ``BertModel`` (``model.encoder``) and is
called exactly like it (``input_ids`` or ``inputs_embeds``, ``attention_mask`` 2D or a prepared
4D mask, ``token_type_ids``, ``position_ids``); it returns an object with ``last_hidden_state``.
Everything around the encoder stays PyTorch: the item-token retriever's input embeddings (item
tokens and word pieces), the heads, the item-vector table and every score after the encoder, so
item vectors are exact and only the encoder's passes change.

The encoder is exported with ``torch.onnx.export`` once per call signature (which inputs are
given, their ranks and dtypes; serving uses one), batch and sequence length left dynamic, and
loaded into an ``onnxruntime.InferenceSession`` on the CPU with all graph optimisations (ORT fuses
layer norms, GELU and attention into its own kernels) and as many intra-op threads as torch has
(a replica's ``torch_threads``). ``onnx-int8`` quantizes the exported graph's matrix products with
ONNX Runtime's own dynamic quantization (int8 weights, one scale per output channel; activations
quantized per batch). The ONNX files live in a temporary directory only while a session loads.
Measured speed and NDCG@10 against fp32 eager: docs/benchmarks.md ("ONNX Runtime").
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

log = logging.getLogger(__name__)

# the encoder's keyword inputs, in the order the exported graph takes them
INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids")


class _Export(nn.Module):
    """The encoder as a positional function of the inputs in ``names``, for torch.onnx.export."""

    def __init__(self, encoder: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.encoder, self.names = encoder, names

    def forward(self, *tensors):
        kwargs = dict(zip(self.names, tensors, strict=True))
        return self.encoder(**kwargs, use_cache=False).last_hidden_state


def _dynamic_axes(name: str, ndim: int) -> dict[int, str]:
    if ndim == 4:  # a prepared (B, 1, L, L) mask
        return {0: "batch", 2: "seq", 3: "seq"}
    return {0: "batch", 1: "seq"}


class OrtEncoder(nn.Module):
    """A BERT encoder behind ONNX Runtime (see the module docstring)."""

    def __init__(self, encoder: nn.Module, quantize: bool = False):
        super().__init__()
        self.torch_encoder = encoder.eval()  # kept to export further signatures; its weights stay in memory
        self.config = encoder.config
        self.embeddings = encoder.embeddings  # the item-token retriever embeds its own inputs with these
        self.quantize = quantize
        self.threads = torch.get_num_threads()  # the replica's torch_threads, set before the model loads
        self._sessions: dict[tuple, object] = {}

    @property
    def exported(self) -> list[tuple]:
        """The call signatures exported so far."""
        return list(self._sessions)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, token_type_ids=None,
                position_ids=None, use_cache=None, **unused) -> BaseModelOutput:
        if unused:
            raise TypeError(f"OrtEncoder does not take {', '.join(sorted(unused))}")
        given = dict(zip(INPUTS, (input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids), strict=True))
        feeds = {k: v for k, v in given.items() if v is not None}
        key = tuple((k, v.dim(), str(v.dtype)) for k, v in feeds.items())
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = self._export(feeds)
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        (hidden,) = session.run(["last_hidden_state"], arrays)
        return BaseModelOutput(last_hidden_state=torch.from_numpy(np.ascontiguousarray(hidden)))

    def _export(self, feeds: dict[str, torch.Tensor]):
        import onnxruntime as ort

        names = tuple(feeds)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="recsys-onnx-") as tmp:
            path = Path(tmp) / "encoder.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about Python values in HF's mask code
                torch.onnx.export(
                    _Export(self.torch_encoder, names), tuple(feeds[n] for n in names), str(path),
                    input_names=list(names), output_names=["last_hidden_state"],
                    dynamic_axes={**{n: _dynamic_axes(n, feeds[n].dim()) for n in names},
                                  "last_hidden_state": {0: "batch", 1: "seq"}},
                    opset_version=17, do_constant_folding=True, dynamo=False,
                )
            if self.quantize:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantized = Path(tmp) / "encoder-int8.onnx"
                quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"])
                path = quantized
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        log.info("exported the encoder to ONNX%s for inputs %s in %.1f s", " (int8)" if self.quantize else "",
                 ", ".join(f"{n}{tuple(feeds[n].shape)}" for n in names), time.perf_counter() - t0)
        return session
