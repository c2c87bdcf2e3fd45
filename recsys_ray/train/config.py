"""Everything a training run needs: presets in ``configs/*.yaml`` carry the same fields."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from recsys_ray.config import build_config, location_problems
from recsys_ray.evaluate.metrics import METRIC_NAMES, SEARCH_METRIC_NAMES
from recsys_ray.model import kinds
from recsys_ray.model.base import TrainSettings, ValidationSettings
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.losses import LOSSES, LossName


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup and linear decay."""

    RANGES: ClassVar[dict[str, str]] = {
        "lr": "> 0", "weight_decay": ">= 0", "warmup_ratio": "[0, 1)", "grad_clip": ">= 0",
        "grad_accum": ">= 1", "new_lr": ">= 0",
    }

    lr: float = 5e-5  # peak learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_ratio: float = 0.1  # fraction of all steps spent warming up
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step
    new_lr: float = 0.0  # peak lr of the parameters that are not pretrained (head, item embeddings); 0 = lr


@dataclasses.dataclass
class EarlyStoppingConfig:
    """Stop a run when its validation ``metric`` has not improved by more than ``min_delta`` for
    ``patience`` epochs; the best checkpoint is kept as always. Off while ``patience`` is 0."""

    RANGES: ClassVar[dict[str, str]] = {"patience": ">= 0", "min_delta": ">= 0"}

    metric: str = "ndcg@10"
    patience: int = 0  # epochs without an improvement before stopping (0 = off)
    min_delta: float = 0.0  # an improvement must exceed this


@dataclasses.dataclass
class EvalConfig:
    """End-of-epoch validation."""

    RANGES: ClassVar[dict[str, str]] = {"max_users": ">= 0", "ranker_candidates": ">= 2", "batch_size": ">= 1"}

    max_users: int = 0  # validate on the first N validation users (0 = all)
    ranker_candidates: int = 100  # ranker: 1 positive + (N - 1) sampled unseen items (labelled "sampled")
    batch_size: int = 64  # contexts (retriever) or pairs (ranker) per forward pass
    seed: int = 0  # seed of the ranker's sampled candidate lists


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; presets in configs/*.yaml carry the same fields."""

    RANGES: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("batch_size", "epochs", "num_workers", "keep_checkpoints", "log_every", "bucket_batches"), ">= 1"),
        **dict.fromkeys(("negatives", "max_steps_per_epoch", "max_context_tokens", "checkpoint_every_steps",
                         "max_failures", "torch_threads", "resource_wait_s"), ">= 0"),
    }

    data: str = "artifacts/ml-100k"  # prepared data directory (jobs/prepare_data.py output)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossName = "softmax"  # retriever + softmax = in-batch negatives too
    negatives: int = 4  # negatives per positive used from the prepared examples (<= prepared)
    batch_size: int = 16  # examples per worker per micro-batch
    epochs: int = 1  # passes (of steps_per_epoch steps) over the train split
    max_steps_per_epoch: int = 0  # cap on steps per epoch (0 = the whole split)
    max_context_tokens: int = 0  # cut contexts further at batch time (0 = as prepared)
    bucket_batches: int = 8  # length bucketing: sort this many batches' rows by length, then batch
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    early_stopping: EarlyStoppingConfig = dataclasses.field(default_factory=EarlyStoppingConfig)
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker; bf16 autocast on GPU only
    resources_per_worker: dict = dataclasses.field(default_factory=dict)  # e.g. {"CPU": 1}
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers over nodes
    resource_wait_s: float = 60.0  # how long the cluster may take to offer the workers' resources (autoscaling)
    storage_path: str = "artifacts/runs"  # run storage: local path or s3:// URI
    s3_endpoint: str | None = None  # S3-compatible store (MinIO, ...); default AWS_ENDPOINT_URL(_S3) or AWS
    name: str = "train"  # run name under storage_path (same name = resume)
    # warm start: a fresh run starts from this checkpoint's weights (a checkpoint, a run directory
    # = its best checkpoint, or an s3:// URI) and its model config; items new to it get their item
    # tokens from their text, removed ones are dropped. A resumed run continues from its own checkpoint
    init_from: str = ""
    keep_checkpoints: int = 2  # best K checkpoints by validation ndcg@10
    checkpoint_every_steps: int = 0  # extra mid-epoch checkpoints (0 = end of epoch only)
    max_failures: int = 0  # worker failures tolerated (restarts from the latest checkpoint)
    log_every: int = 10  # rank 0 prints a progress line every N steps
    seed: int = 0  # model init, data order, dropout
    # refit: also train on each user's validation event (the item-token retriever), as the
    # baselines are refitted on everything before the test event. Validation is then in sample,
    # so it is not run: the run keeps its last epoch; choose epochs and the prior's beta on a run
    # without refit (docs/quality.md)
    refit: bool = False
    torch_threads: int = 0  # intra-op threads per worker (0 = CPUs per worker)

    def problems(self) -> list[str]:
        out = []
        kind = kinds.model_kind_problem(self.model)
        if kind:
            out.append(kind)
        if LOSSES[self.loss].needs_negatives and self.negatives < 1:
            out.append(f"loss {self.loss!r} needs negatives >= 1")
        if (self.model.kind, self.model.history) == ("ranker", "items"):
            if self.negatives < 1:
                out.append("negatives: an items ranker ranks each target against negatives >= 1 hard negatives")
            elif self.model.hard_pool and self.negatives > self.model.hard_pool:
                out.append(f"negatives ({self.negatives}) must be <= model.hard_pool ({self.model.hard_pool}), "
                           "the shortlist they are drawn from")
        if self.refit and (self.model.kind, self.model.history) != ("retriever", "items"):
            out.append("refit: only the item-token retriever (model.kind retriever, model.history items) trains on "
                       "the validation events")
        elif self.refit and self.early_stopping.patience:
            out.append("refit: early_stopping needs validation, and a refit run trains on it (keep early_stopping.patience 0)")
        metric = self.early_stopping.metric
        if metric in SEARCH_METRIC_NAMES and not self.model.search_mix:
            out.append(f"early_stopping.metric: {metric!r} is reported by search models only (model.search_mix > 0)")
        elif metric not in METRIC_NAMES + SEARCH_METRIC_NAMES:
            out.append(f"early_stopping.metric: {metric!r} is not a validation metric "
                       f"(one of {', '.join(METRIC_NAMES)}; a search model also reports each as search_<metric>)")
        return out + location_problems(self.storage_path, self.name)

    def train_settings(self) -> TrainSettings:
        """What a model kind's batches and loss read."""
        return TrainSettings(loss=self.loss, negatives=self.negatives, max_context_tokens=self.max_context_tokens,
                             seed=self.seed, refit=self.refit)

    def eval_settings(self) -> ValidationSettings:
        """What a model kind's validation reads."""
        return ValidationSettings(batch_size=self.eval.batch_size, ranker_candidates=self.eval.ranker_candidates,
                            seed=self.eval.seed, max_context_tokens=self.max_context_tokens)


def load_train_config(data: dict | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Validate a training config (dict + ``--set`` overrides); every problem in one ConfigError."""
    return build_config(TrainConfig, data, overrides)
