"""The one predictor class: offline evaluation (Ray Data batch inference) and Ray Serve wrap it.

A :class:`Predictor` holds a retriever and/or a ranker checkpoint and the catalogue. How a user
and candidates become model inputs is each model kind's own (:mod:`recsys_ray.model.kinds`);
the Predictor adds what is common to all of them:

- ``user_inputs(user, role)`` / ``context_ids(history, profile, role)``: a user (history oldest
  first, a profile mapping or text) as the model's context ids;
- ``example_contexts(batch, role)``: the contexts of prepared valid/test example rows;
- ``candidates(item_ids, texts)`` / ``candidate_ids(rows)``: candidates as model inputs;
- ``retrieve(contexts, k, exclude)``: full-catalogue top k by the retriever (item vectors are
  computed once and kept), optionally plus a popularity prior ``beta * log(1 + train count)``;
  exact, or approximate with ``index="ivf"`` (:mod:`recsys_ray.index`);
- ``score_pairs(contexts, candidates)``: ranker logits for (context, candidate) pairs;
- ``score(context, candidates)`` / ``score_many``: what ``POST /v1/score`` answers (ranker if
  loaded, else the retriever's scaled cosine);
- ``recommend(contexts, k, exclude)``: two-stage: the retriever's top ``rerank_top`` rescored by
  the ranker (:func:`rerank_order`).

Everything takes token ids without special tokens (what the prepared data stores); nothing is
cached per request, so results are the same whatever the batch composition.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from recsys_ray import checkpoint
from recsys_ray.data import text as T
from recsys_ray.data.catalogue import CATALOGUE_FILE, Catalogue
from recsys_ray.data.examples import MAX_QUERY_TOKENS
from recsys_ray.data.tokenize import encode_texts
from recsys_ray.errors import RecsysError
from recsys_ray.index import INDEXES, IVFIndex, top_k
from recsys_ray.model import kinds
from recsys_ray.model.base import BertRecommender, InputSettings, Retriever
from recsys_ray.model.compress import compress
from recsys_ray.model.tokenizer import vocab_digest

log = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 20
DEFAULT_MAX_CONTEXT_TOKENS = 256
MAX_TEXT_TOKENS = 64  # a free candidate text is cut to this many tokens, never refused
ROLES = ("retriever", "ranker")


@dataclass
class PredictorConfig:
    retriever: str | None = None  # checkpoint, run dir (its best checkpoint) or s3:// URI
    ranker: str | None = None  # same forms
    items: str | None = None  # default: the checkpoint's items.parquet
    device: str = "cpu"
    batch_size: int = 64  # contexts or pairs per forward pass
    rerank_top: int = 50
    popularity_weight: float = 0.0  # beta of the retriever's popularity prior
    max_context_tokens: int | None = None  # default: what the checkpoint trained with
    torch_threads: int | None = None
    # items= may differ from the checkpoint's catalogue (a newer window): the model takes it as a
    # warm start would (BertRecommender.adopt_catalogue: new items from their text, removed ones dropped)
    adopt_items: bool = False
    index: str = "exact"  # retrieve(): exact (every item scored) | ivf (faiss IVF, approximate; recsys_ray.index)
    index_nprobe: int = 32  # ivf: groups searched per user (more = closer to exact, slower)
    index_nlist: int = 0  # ivf: groups (0 = about 4 sqrt(items))
    precision: str = "fp32"  # fp32 | int8 (dynamic quantization, CPU) | bf16 | fp16 (half-precision encoder, GPU); recsys_ray.model.compress


def rerank_order(ranker_scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the top k of a reranked shortlist: ranker score descending, ties keep the
    retriever's order (a stable sort of the shortlist as the retriever ranked it)."""
    return np.argsort(-np.asarray(ranker_scores), kind="stable")[:k]


class Predictor:
    """Retriever and/or ranker + catalogue; see the module docstring."""

    def __init__(self, cfg: PredictorConfig | None = None, **kwargs):
        cfg = cfg or PredictorConfig(**kwargs)
        if not cfg.retriever and not cfg.ranker:
            raise RecsysError("a predictor needs a retriever or a ranker checkpoint")
        if cfg.batch_size < 1 or cfg.rerank_top < 1:
            raise RecsysError("batch_size and rerank_top must be >= 1")
        if cfg.index not in INDEXES:
            raise RecsysError(f"index {cfg.index!r}: one of {', '.join(INDEXES)}")
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.origins: dict[str, str] = {}  # role -> the checkpoint loaded (run dirs resolved)
        self.retriever: Retriever | None = self._load(cfg.retriever, "retriever") if cfg.retriever else None
        self.ranker: BertRecommender | None = self._load(cfg.ranker, "ranker") if cfg.ranker else None
        models = [m for m in (self.retriever, self.ranker) if m is not None]
        self.tokenizer = models[0].tokenizer
        if len(models) == 2 and vocab_digest(models[0].tokenizer) != vocab_digest(models[1].tokenizer):
            raise RecsysError("retriever and ranker checkpoints use different vocabularies")
        # the checkpoints' local folders hold their catalogue (an s3:// one was copied by _load)
        items_path = cfg.items or next((m.source for m in models if (m.source / CATALOGUE_FILE).is_file()), None)
        if items_path is None:
            raise RecsysError(f"no catalogue: the checkpoint has no {CATALOGUE_FILE}; pass items= (a prepared data dir)")
        self.items = Catalogue.load(items_path)
        if len(self.items) == 0:
            raise RecsysError(f"{items_path}: the catalogue is empty")
        self.adopted: dict[str, dict] = {}  # role -> {"kept", "new", "dropped"} (adopt_items)
        for role, model in zip(ROLES, (self.retriever, self.ranker), strict=True):
            if model is not None and cfg.adopt_items and (model.source / CATALOGUE_FILE).is_file():
                self.adopted[role] = model.adopt_catalogue(Catalogue.load(model.source), self.items)
        for model in models:
            problem = model.catalogue_problem(self.items)
            if problem:
                raise RecsysError(f"{model.source}: {problem} ({items_path})")
        # text settings of the first model's checkpoint apply to both (one rendering per request)
        text = dict(models[0].extra.get("text") or {})
        train_cfg = models[0].extra.get("train_config") or {}
        self.inputs = InputSettings(
            tokenizer=self.tokenizer,
            max_history=int(text.get("max_history") or DEFAULT_MAX_HISTORY),
            profile_columns=list(text.get("user_profile_columns") or []),
            max_context_tokens=int(cfg.max_context_tokens or train_cfg.get("max_context_tokens")
                                   or text.get("max_context_tokens") or DEFAULT_MAX_CONTEXT_TOKENS),
        )
        self.special = self.inputs.special
        self._item_vecs: torch.Tensor | None = None
        self._index: IVFIndex | None = None  # cfg.index == "ivf": built on first use (build_index)
        self._prior = self._popularity_prior()
        self._swap = threading.Lock()  # add_items replaces (items, item vectors, prior) together
        if cfg.precision.startswith("onnx"):
            self._warm_up()

    def _warm_up(self) -> None:
        """One pass of each model on a one-item history, so that the ONNX exports happen while the
        Predictor loads (a replica's start-up), not in its first request."""
        with torch.no_grad():
            if self.retriever is not None:
                self.user_vectors([self.context_ids(self.items.ids[:1], kind="retriever")])
            if self.ranker is not None:
                self.score_pairs([self.context_ids(self.items.ids[:1], kind="ranker")], self.candidate_ids([0]))

    def _load(self, path: str, role: str) -> BertRecommender:
        origin = checkpoint.locate(path)  # the checkpoint itself (a URI stays one): what /readyz reports
        model = kinds.load_model(checkpoint.resolve(origin), map_location=self.device, expect=role)
        self.origins[role] = origin
        return compress(model, self.cfg.precision, self.device)

    def _popularity_prior(self, items: Catalogue | None = None) -> np.ndarray | None:
        items = items or self.items
        if not self.cfg.popularity_weight:
            return None
        if items.counts is None:
            raise RecsysError("popularity_weight needs train counts in the catalogue (train_count column)")
        return (self.cfg.popularity_weight * np.log1p(items.counts)).astype(np.float32)

    def check_new_items(self, item_ids: Sequence[str], texts: Sequence[str]) -> None:
        """What :meth:`add_items` refuses, without adding anything (RecsysError naming the ids)."""
        if len(item_ids) != len(texts) or not item_ids:
            raise RecsysError("give one text per item id, at least one item")
        counts: dict[str, int] = {}
        for iid in item_ids:
            counts[iid] = counts.get(iid, 0) + 1
        clash = [i for i in counts if counts[i] > 1 or i in self.items.index]
        if clash:
            shown = ", ".join(repr(i) for i in clash[:10]) + (" ..." if len(clash) > 10 else "")
            raise RecsysError(f"item id(s) already in the catalogue or given twice: {shown}")

    def add_items(self, item_ids: Sequence[str], texts: Sequence[str]) -> int:
        """Append catalogue items from their text, without retraining: each model takes the grown
        catalogue as a warm start would (item-token retrievers: the new items' tokens from their
        text), the new items' vectors are computed and appended, their popularity prior is 0.
        Ids already in the catalogue (or given twice) are refused, naming them; nothing changes
        then. Returns the catalogue's new size. Rows only grow, so a row number read before the
        call still means the same item."""
        self.check_new_items(item_ids, texts)
        max_tokens = int((self._model(None).extra.get("text") or {}).get("max_item_tokens") or MAX_TEXT_TOKENS)
        tokens = self.text_ids(texts, max_tokens)
        old = self.items
        table = old.table()
        added = {"item_id": pa.array(list(item_ids), pa.string()), "text": pa.array(list(texts), pa.string()),
                 "input_ids": pa.array(tokens, pa.list_(pa.int32()))}
        if "train_count" in table.column_names:
            added["train_count"] = pa.array([0] * len(item_ids), pa.int64())
        new = Catalogue(pa.concat_tables([table, pa.table(added).select(table.column_names)]))
        for model in (self.retriever, self.ranker):
            if model is not None:
                model.adopt_catalogue(old, new)
        rows = list(range(len(old), len(new)))
        vecs = self._item_vecs
        if vecs is not None:
            retriever = self._model("retriever")
            fresh = retriever.candidate_vectors(
                retriever.candidate_ids(rows, new), self.special, self.device, self.cfg.batch_size,
                lambda: retriever.catalogue_vectors(new, self.special, self.device, self.cfg.batch_size))
            vecs = torch.cat([vecs, fresh.to(vecs.device)])
        prior = self._popularity_prior(new)
        with self._swap:  # a retrieval in another thread sees the old or the new catalogue, whole
            if self._index is not None and vecs is not None:
                # faiss ids are sequential: the new rows follow the old ones, as in the catalogue
                self._index.add(vecs[len(old):].cpu().numpy(), None if prior is None else prior[len(old):])
            self.items, self._item_vecs, self._prior = new, vecs, prior
            if self._index is not None and vecs is None:
                self._index = None  # no vectors yet: built from the grown catalogue on first use
        return len(new)

    def reinit_items(self, item_ids: Sequence[str]) -> None:
        """These items back to their first-training vectors (from their text) in every model, as
        if training had never seen them (evaluate does it for a data set's held-out cold items)."""
        rows = self.items.rows(list(item_ids))
        for model in (self.retriever, self.ranker):
            if model is not None:
                model.reinit_items(rows, [self.items.tokens[r] for r in rows])
        with self._swap:
            self._item_vecs = None
            self._index = None

    @property
    def roles(self) -> list[str]:
        """The roles this predictor has a model for ("retriever", "ranker")."""
        return [k for k, m in (("retriever", self.retriever), ("ranker", self.ranker)) if m is not None]

    @property
    def max_context_tokens(self) -> int:
        return self.inputs.max_context_tokens

    def _model(self, role: str | None) -> BertRecommender:
        """The model of ``role`` (default: the retriever if loaded, else the ranker)."""
        role = role or ("retriever" if self.retriever is not None else "ranker")
        model = self.retriever if role == "retriever" else self.ranker
        if model is None:
            raise RecsysError(f"this predictor has no {role} checkpoint")
        return model

    # --- inputs ---------------------------------------------------------------------------------

    def profile_text(self, profile: Mapping[str, object] | str | None) -> str:
        if profile is None:
            return ""
        if isinstance(profile, str):
            return " ".join(profile.split())
        return T.render_profile(profile, self.inputs.profile_columns or list(profile))

    def context_ids(self, history: Sequence[str], profile: Mapping[str, object] | str | None = None,
                    kind: str | None = None) -> list[int]:
        """Model input ids of a user for the model of role ``kind``: ``history`` oldest first (as
        logged); unknown ids raise :class:`~recsys_ray.errors.UnknownItems` naming them."""
        rows = self.items.rows(list(history))
        ptext = self.profile_text(profile)
        pids = encode_texts(self.tokenizer, [ptext])[0] if ptext else None
        return self._model(kind).context_ids(rows, pids, self.items, self.inputs)

    def user_inputs(self, user: Mapping, kind: str | None = None) -> list[int]:
        """:meth:`context_ids` of a request's ``{"history": [...], "profile": ...}``."""
        return self.context_ids(user.get("history") or [], user.get("profile"), kind=kind)

    def example_contexts(self, batch: Mapping[str, Sequence], kind: str | None = None) -> list[list[int]]:
        """Contexts of prepared valid/test example rows for the model of role ``kind``."""
        return self._model(kind).example_contexts(batch, self.items, self.inputs)

    @property
    def searches(self) -> bool:
        """Whether the retriever answers a typed query (:meth:`search_context`)."""
        return self.retriever is not None and self.retriever.searches

    def search_context(self, context: Sequence[int] | None, query: str) -> list[int]:
        """Input ids of a search: a user's :meth:`context_ids` (None: no user, plain search) and the
        query, cut to MAX_QUERY_TOKENS word pieces (never refused for its length)."""
        if not self.searches:
            raise RecsysError("this checkpoint was not trained for search (model.search_mix is 0): "
                              "train one with --set model.search_mix=0.5 on logs with queries")
        text = " ".join(str(query).split())
        if not text:
            raise RecsysError("query is empty")
        qids = encode_texts(self.tokenizer, [text], MAX_QUERY_TOKENS)[0]
        return self.retriever.search_context(context, qids, self.special)

    @property
    def scores_texts(self) -> bool:
        """Whether :meth:`score` takes free-text candidates (the model that scores must read text)."""
        return self._scorer().scores_texts

    def _scorer(self) -> BertRecommender:
        return self.ranker if self.ranker is not None else self._model("retriever")

    def candidate_ids(self, rows: Sequence[int]) -> list[list[int]]:
        """Catalogue rows as candidates for :meth:`score` (the scoring model's inputs)."""
        return self._scorer().candidate_ids(rows, self.items)

    def text_ids(self, texts: Sequence[str], max_tokens: int = MAX_TEXT_TOKENS) -> list[list[int]]:
        """Free candidate texts -> token ids (over-long texts are cut, never refused)."""
        return encode_texts(self.tokenizer, [" ".join(t.split()) for t in texts], max_tokens)

    def candidates(self, item_ids: Sequence[str] | None, texts: Sequence[str] | None) -> list[list[int]]:
        """A request's candidates (catalogue ``item_ids`` or free ``texts``) as :meth:`score` inputs."""
        if item_ids is not None:
            return self.candidate_ids(self.items.rows(list(item_ids)))
        if not self.scores_texts:
            raise RecsysError("this model reads item tokens (history='items'): score catalogue item_ids, not texts")
        return self.text_ids(list(texts or []))

    # --- retriever ------------------------------------------------------------------------------

    def user_vectors(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Retriever vectors (B, H) of contexts."""
        return self._model("retriever").user_vectors(contexts, self.special, self.device, self.cfg.batch_size,
                                                     self.max_context_tokens)

    def candidate_vectors(self, candidates: Sequence[Sequence[int]]) -> torch.Tensor:
        """Retriever vectors (N, H) of candidates (see :meth:`candidate_ids`)."""
        return self._model("retriever").candidate_vectors(candidates, self.special, self.device, self.cfg.batch_size,
                                                          self.item_vectors)

    def item_vectors(self) -> torch.Tensor:
        """Every catalogue item's vector (I, H), computed on first use and kept."""
        if self._item_vecs is None:
            self._item_vecs = self._model("retriever").catalogue_vectors(self.items, self.special, self.device,
                                                                         self.cfg.batch_size)
        return self._item_vecs

    def retrieval_scores(self, contexts: Sequence[Sequence[int]], with_prior: bool = True) -> np.ndarray:
        """(B, I) scaled cosine of each context with every item (+ the popularity prior)."""
        self.item_vectors()
        with self._swap:
            vecs, prior = self._item_vecs, self._prior
        scores = self._model("retriever").score(self.user_vectors(contexts), vecs).numpy()
        if with_prior and prior is not None:
            scores = scores + prior[None, :]
        return scores

    def build_index(self) -> IVFIndex | None:
        """The approximate item index of ``cfg.index`` (None for exact), built once from the item
        vectors and the prior; a replica builds it at start-up, add_items extends it."""
        if self.cfg.index == "exact":
            return None
        self.item_vectors()
        with self._swap:
            if self._index is None:
                self._index = IVFIndex(self._item_vecs.cpu().numpy(), self._model("retriever").cfg.temperature,
                                       self._prior, nlist=self.cfg.index_nlist, nprobe=self.cfg.index_nprobe)
            return self._index

    def retrieve(self, contexts: Sequence[Sequence[int]], k: int,
                 exclude: Sequence[Sequence[int]] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per context: (item rows, scores) of the top k, best first, ``exclude`` rows left out
        (``index="ivf"``: the approximate top k, each with its exact score)."""
        index = self.build_index()
        if index is not None:
            users = self.user_vectors(contexts).cpu().numpy()
            with self._swap:  # add_items extends the index under the same lock
                return index.search(users, k, exclude)
        scores = self.retrieval_scores(contexts)
        return [top_k(scores[j], k, exclude[j] if exclude else ()) for j in range(len(contexts))]

    # --- ranker ---------------------------------------------------------------------------------

    def score_pairs(self, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> np.ndarray:
        """Ranker logits (P,) for pairs (contexts[p], candidates[p]), in the given order."""
        return self._model("ranker").score_pairs(contexts, candidates, self.special, self.device,
                                                 self.cfg.batch_size, self.max_context_tokens)

    def rerank(self, context: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """Ranker scores of catalogue rows for one context."""
        return self.score_pairs([context] * len(rows), self.ranker.candidate_ids(rows, self.items))

    # --- what the API answers -------------------------------------------------------------------

    def score(self, context: Sequence[int], candidates: Sequence[Sequence[int]]) -> np.ndarray:
        """One user's score per candidate (token ids), in order: ranker if loaded, else retriever."""
        return self.score_many([context], [candidates])[0]

    def score_many(self, contexts: Sequence[Sequence[int]],
                   candidates: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """:meth:`score` for several users in one pass (what a batched replica calls)."""
        bounds = np.cumsum([0] + [len(cs) for cs in candidates])
        if self.ranker is not None:
            flat_ctx = [c for c, cs in zip(contexts, candidates, strict=True) for _ in cs]
            flat = self.score_pairs(flat_ctx, [i for cs in candidates for i in cs])
            return [flat[bounds[j] : bounds[j + 1]] for j in range(len(contexts))]
        model = self._model("retriever")
        users = self.user_vectors(contexts)
        items = self.candidate_vectors([i for cs in candidates for i in cs])
        return [model.score(users[j : j + 1], items[bounds[j] : bounds[j + 1]]).numpy()[0] for j in range(len(contexts))]

    def recommend(self, contexts: Sequence[Sequence[int]], k: int,
                  exclude: Sequence[Sequence[int]] | None = None,
                  rank_contexts: Sequence[Sequence[int]] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top k catalogue rows per context: retrieve ``max(k, rerank_top)``, rerank with the ranker.

        ``rank_contexts``: the ranker's contexts when they differ from the retriever's (an
        item-token retriever with a text ranker); default ``contexts``.
        Without a retriever the ranker scores the whole catalogue (slow; small catalogues only).
        """
        rank_contexts = rank_contexts if rank_contexts is not None else contexts
        if k < 1:
            raise ValueError("k must be >= 1")
        n = max(k, self.cfg.rerank_top)
        if self.retriever is not None:
            shortlist = self.retrieve(contexts, n if self.ranker is not None else k, exclude)
        else:
            shortlist = [(np.setdiff1d(np.arange(len(self.items)), np.asarray(exclude[j] if exclude else [], dtype=np.int64)), None)
                         for j in range(len(contexts))]
        if self.ranker is None:
            return shortlist
        out = []
        for j, (rows, _) in enumerate(shortlist):
            s = self.rerank(rank_contexts[j], rows)
            order = rerank_order(s, k)
            out.append((np.asarray(rows)[order], s[order]))
        return out


