"""Item-token ranker: the item-token retriever's reading of the user, with each candidate appended
as its own item token, trained on the retriever's hard candidates with a listwise loss.

``model.kind: ranker``, ``history: items``. Two copies of an item-token retriever: ``base``, frozen
(the first stage it reranks: it draws the training negatives and gives each candidate its retrieval
score), and a trainable copy that reads ``[CLS] profile [SEP] item_1 .. item_L`` then one token per
candidate, each in its own block (:func:`pack_candidates`): a candidate sees the whole history at
every layer and nothing of the other candidates, at the position the next item would take, so one
pass scores a user's whole shortlist (a cross-encoder per candidate at the cost of one sequence per
user). Score of candidate ``c`` = ``base``'s retrieval score (cosine / temperature) + ``Linear(H,
1)`` of the trainable copy's hidden state at ``c``'s token. The residual head starts at zero, so a
ranker started from a retriever (``init_from``) ranks exactly as it does and learns only the
correction; the frozen base cannot drift while the copy trains.

Training (``sequences/``): per window one list, the window's last event and ``negatives`` items,
``round(hard_share * negatives)`` of them drawn from ``base``'s top ``model.hard_pool`` (the user's
earlier items and the target excluded; ``hard_pool: 0`` = all uniform), read by the training
``loss`` (softmax = listwise); ``retrieval_weight`` > 0 adds the copy's own next-item softmax.
With ``holdout_last`` k (and a retriever trained with the same k) every list ends at one of the
user's last k train events, which the base never trained on: its shortlists then look like the
ones it gives at serving time, not memorised ones. Validation = the two-stage protocol it is for:
full ranking by ``base``, its top ``hard_pool`` rescored; a target outside keeps its rank.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from recsys_ray.errors import RecsysError
from recsys_ray.evaluate.metrics import target_ranks
from recsys_ray.model import losses
from recsys_ray.model.base import Batch, TrainSettings, ValidationSettings, ordered_chunks
from recsys_ray.model.config import ModelConfig
from recsys_ray.model.encoder import apply_freeze
from recsys_ray.model.kinds.item_retriever import ItemTokenRetriever, SequenceCollator

MAX_CANDIDATES_PER_ROW = 256  # longer candidate lists are scored in several rows


def pack_candidates(input_ids: torch.Tensor, n_main: torch.Tensor, candidate_ids: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append candidate tokens to causal rows.

    ``input_ids`` (B, L) right-padded rows of ``n_main`` (B,) real tokens, ``candidate_ids`` (B, C)
    input ids -> ``ids`` (B, L'), ``position_ids`` (B, L'), ``visible`` (B, L', L') bool and the
    candidates' columns (B, C). Row i holds its ``n_main[i]`` tokens, then its C candidates, then
    padding; a candidate sees the row's real tokens and itself, at position ``n_main[i]``; main
    tokens stay causal and never see a candidate; padding sees only itself.
    """
    b, c = candidate_ids.shape
    width = int(n_main.max()) + c
    idx = torch.arange(width, device=input_ids.device)  # (L',)
    n = n_main[:, None]  # (B, 1)
    cols = n + torch.arange(c, device=input_ids.device)[None, :]  # (B, C)
    ids = torch.zeros(b, width, dtype=input_ids.dtype, device=input_ids.device)
    main = idx[None, :] < n  # (B, L')
    ids[:, : input_ids.shape[1]] = torch.where(main[:, : input_ids.shape[1]], input_ids, 0)
    ids.scatter_(1, cols, candidate_ids)
    cand = (idx[None, :] >= n) & (idx[None, :] < n + c)  # (B, L')
    causal = idx[None, :] <= idx[:, None]  # (L', L') key <= query
    visible = (main[:, :, None] & main[:, None, :] & causal[None]) | (cand[:, :, None] & main[:, None, :])
    visible |= torch.eye(width, dtype=torch.bool, device=ids.device)[None]
    position_ids = torch.where(main, idx[None, :], torch.where(cand, n, 0))
    return ids, position_ids, visible, cols


class ItemTokenRanker(ItemTokenRetriever):
    """A frozen item-token retriever (``base``) + a trainable copy with a residual per-candidate head."""

    kind = "ranker"
    history = "items"

    def _add_head(self, hidden: int) -> None:
        super()._add_head(hidden)  # the copy's projection (its next-item loss, retrieval_weight > 0)
        self.rank_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.rank_head.weight)  # zero at first: ranks as the base does
        nn.init.zeros_(self.rank_head.bias)
        base_cfg = dataclasses.replace(self.cfg, kind="retriever")
        self.base = ItemTokenRetriever(base_cfg, copy.deepcopy(self.encoder), None, num_items=self.num_items).eval()
        self.base.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True) -> ItemTokenRanker:
        super().requires_grad_(requires_grad)
        self.base.requires_grad_(False)  # the first stage never trains (freeze strategies apply to the copy)
        if not self.cfg.retrieval_weight:
            self.head.requires_grad_(False)  # the copy's projection serves only its next-item loss
        for name in ("text_proj", "text_tower"):  # item_text_dropout / _encoder are a retriever's training options
            if hasattr(self, name):
                getattr(self, name).requires_grad_(False)
        return self

    def encoder_owners(self) -> list[nn.Module]:
        return [self, self.base]  # both passes: the base's retrieval score and the copy's candidates

    def train(self, mode: bool = True) -> ItemTokenRanker:
        super().train(mode)
        self.base.eval()  # no dropout in the first stage's scores
        return self

    @classmethod
    def from_retriever(cls, retriever: ItemTokenRetriever, cfg: ModelConfig) -> ItemTokenRanker:
        """A ranker whose base and trainable copy are both ``retriever`` (the residual head at zero):
        the retriever's model config with ``cfg``'s kind, freeze and ranker fields."""
        if (retriever.cfg.kind, retriever.cfg.history) != ("retriever", "items"):
            raise RecsysError(f"an items ranker starts from an item-token retriever, not a "
                              f"{retriever.cfg.kind}/{retriever.cfg.history} checkpoint")
        if cfg.holdout_last != retriever.cfg.holdout_last:
            raise RecsysError(f"model.holdout_last {cfg.holdout_last}: the retriever was trained with holdout_last "
                              f"{retriever.cfg.holdout_last} (the ranker's lists are the events its retriever never trained on)")
        new_cfg = dataclasses.replace(retriever.cfg, kind="ranker", freeze=cfg.freeze, hard_pool=cfg.hard_pool,
                                      hard_share=cfg.hard_share, retrieval_weight=cfg.retrieval_weight, search_mix=0.0)
        model = cls(new_cfg, copy.deepcopy(retriever.encoder), retriever.tokenizer, num_items=retriever.num_items)
        state = retriever.state_dict()
        missing, unexpected = model.load_state_dict({**state, **{f"base.{k}": v for k, v in state.items()}}, strict=False)
        if unexpected or set(missing) != {"rank_head.weight", "rank_head.bias"}:
            raise RecsysError(f"cannot start a ranker from this retriever (missing {missing}, unexpected {unexpected})")
        model._item_tokens = list(retriever._item_tokens)
        model.base._item_tokens = list(retriever._item_tokens)
        apply_freeze(model, new_cfg.freeze)
        model.extra, model.source = dict(retriever.extra), retriever.source
        return model.eval()

    @torch.no_grad()
    def adopt_catalogue(self, old, new) -> dict:
        self.base.adopt_catalogue(old, new)
        self.base.requires_grad_(False)
        return super().adopt_catalogue(old, new)

    @torch.no_grad()
    def reinit_items(self, rows, item_tokens) -> None:
        self.base.reinit_items(rows, item_tokens)
        super().reinit_items(rows, item_tokens)

    # --- scoring ---------------------------------------------------------------------------------

    @torch.no_grad()
    def base_users(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The first stage's user vectors (B, H) (the frozen base retriever)."""
        return self.base.encode(input_ids, attention_mask)

    @torch.no_grad()
    def base_scores(self, users: torch.Tensor) -> torch.Tensor:
        """The first stage's scores (B, N) of every catalogue item for :meth:`base_users` vectors."""
        return self.base.score(users, self.base.item_vectors())

    def rank_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, candidates: torch.Tensor,
                    users: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, C) of catalogue rows ``candidates`` (B, C) for each ``[CLS] context`` row, and
        the trainable copy's hidden states (B, L', H) (main positions first, as in the input);
        ``users``: the rows' :meth:`base_users`, when the caller has them already."""
        with torch.no_grad():
            u = self.base_users(input_ids, attention_mask) if users is None else users  # (B, H)
            items = self.base.normalize(self.base.item_emb(candidates))  # (B, C, H) only the candidates' rows
            retrieval = torch.einsum("bh,bch->bc", u, items) / self.cfg.temperature
        n_main = attention_mask.sum(dim=1)  # (B,)
        ids, pos, visible, cols = pack_candidates(input_ids, n_main, candidates + self.item_offset)
        h = self.hidden_states(ids, None, pos, visible)  # (B, L', H)
        rows = torch.arange(len(n_main), device=h.device)
        residual = self.rank_head(h[rows[:, None], cols]).squeeze(-1).float()  # (B, C)
        return retrieval + residual, h

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, candidates: torch.Tensor,
                users: torch.Tensor | None = None) -> torch.Tensor:
        return self.rank_scores(input_ids, attention_mask, candidates, users)[0]

    @torch.no_grad()
    def score_pairs(self, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                    special: tuple[int, int, int], device, batch_size: int, max_context_tokens: int) -> np.ndarray:
        """Scores (P,) of pairs (contexts[p], candidates[p]) (candidates as :meth:`candidate_ids`):
        consecutive pairs of one context share one row of packed candidates."""
        if len(contexts) != len(candidates):
            raise ValueError(f"{len(contexts)} contexts but {len(candidates)} candidates")
        off = self.item_offset
        if any(len(c) != 1 or c[0] < off for c in candidates):
            raise RecsysError("this ranker reads item tokens (history='items'): it scores catalogue item ids, not texts")
        groups: list[tuple[list[int], list[int]]] = []  # (context, pair positions)
        for p, ctx in enumerate(contexts):
            ctx = list(ctx)
            if groups and groups[-1][0] == ctx and len(groups[-1][1]) < MAX_CANDIDATES_PER_ROW:
                groups[-1][1].append(p)
            else:
                groups.append((ctx, [p]))
        out = np.empty(len(contexts), dtype=np.float32)
        per_row = max(1, batch_size // 8)  # rows of up to MAX_CANDIDATES_PER_ROW candidates each
        for idx in ordered_chunks([len(g[0]) for g in groups], per_row):
            part = [groups[i] for i in idx]
            b = self.input_batch([ctx for ctx, _ in part], special)
            width = max(len(ps) for _, ps in part)
            cands = torch.zeros(len(part), width, dtype=torch.long)
            for i, (_, ps) in enumerate(part):
                cands[i, : len(ps)] = torch.as_tensor([candidates[p][0] - off for p in ps])
            scores = self.forward(b["input_ids"].to(device), b["attention_mask"].to(device), cands.to(device)).cpu()
            for i, (_, ps) in enumerate(part):
                out[ps] = scores[i, : len(ps)].numpy()
        return out

    # --- training --------------------------------------------------------------------------------

    def collator(self, catalogue, special, settings: TrainSettings, tokenizer, rank: int):
        return SequenceCollator(catalogue, special, self.item_offset, self.cfg.history_len, settings.negatives,
                                tokenizer, settings.seed + rank, sampled=False, with_history=True,
                                holdout_last=self.cfg.holdout_last, lists_on_holdout=True)

    @torch.no_grad()
    def _negatives(self, batch: Batch, targets: torch.Tensor, k: int, users: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k) negatives per row: ``round(hard_share * k)`` drawn from the top ``hard_pool`` of
        the base's scores, the rest uniform over the catalogue (all uniform when ``hard_pool`` is
        0); never the user's earlier items, the target or one item twice. ``users``: the rows'
        :meth:`base_users`, when the caller has them already."""
        ids, am = batch["input_ids"], batch["attention_mask"]
        n = self.num_items
        hist = batch["history"]  # (B, S), -1 padded
        exclude = torch.zeros(len(ids), n + 1, dtype=torch.bool, device=ids.device)
        exclude.scatter_(1, torch.where(hist >= 0, hist, n), True)
        exclude[torch.arange(len(ids)), targets] = True
        exclude = exclude[:, :n]
        hard = round(self.cfg.hard_share * k) if self.cfg.hard_pool else 0
        picked = torch.empty(len(ids), 0, dtype=torch.long, device=ids.device)
        if hard:
            users = self.base_users(ids, am) if users is None else users
            scores = self.base_scores(users).masked_fill(exclude, float("-inf"))  # (B, N)
            pool = scores.topk(min(self.cfg.hard_pool, n), dim=1).indices
            picked = pool.gather(1, torch.rand(pool.shape, device=ids.device).argsort(dim=1)[:, :hard])
            exclude = exclude.scatter(1, picked, True)
        if k > hard:  # uniform over what is left: the top of random noise
            noise = torch.rand(len(ids), n, device=ids.device).masked_fill(exclude, -1.0)
            picked = torch.cat([picked, noise.topk(k - hard, dim=1).indices], dim=1)
        return picked

    def train_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1 + K) list scores (column 0 the window's last event), and with ``retrieval_weight``
        the copy's (M, N) next-item scores at every position with a target."""
        tgt = batch["targets"]  # (B, L)
        last = batch["last_item"]  # (B,) the window's last event: the target after the history
        users = self.base_users(batch["input_ids"], batch["attention_mask"])  # once: negatives and scores
        negs = self._negatives(batch, last, int(batch["num_negatives"]), users)
        cands = torch.cat([last[:, None], negs], dim=1)  # (B, 1 + K)
        scores, h = self.rank_scores(batch["input_ids"], batch["attention_mask"], cands, users)
        if not self.cfg.retrieval_weight:
            return scores, None
        u = self.normalize(self.head(h[:, : tgt.shape[1]]))[tgt >= 0]  # (M, H)
        return scores, self.score(u, self.item_vectors())  # (M, N); M may be 0

    def train_loss(self, loss: str, scores: torch.Tensor, extra, batch: Batch) -> torch.Tensor:
        """``loss`` over each window's list (+ ``retrieval_weight`` x the copy's next-item softmax)."""
        listwise = losses.compute_loss(loss, scores)
        if extra is None:
            return listwise
        if not len(extra):
            return listwise + 0.0 * extra.sum()  # every trained parameter in the graph (DDP)
        return listwise + self.cfg.retrieval_weight * losses.softmax(extra, batch["targets"][batch["targets"] >= 0])

    # --- validation --------------------------------------------------------------------------------

    @torch.no_grad()
    def validation_ranks(self, rows, catalogue, special, device, settings: ValidationSettings) -> tuple[list[int], str]:
        """Two-stage full ranking: rank by the base (seen items masked, ties against the target),
        its top ``hard_pool`` rescored; outside it, the base's rank (>= hard_pool)."""
        top = self.cfg.hard_pool or 50
        ranks: list[int] = []
        for s in range(0, len(rows), settings.batch_size):
            chunk = rows[s: s + settings.batch_size]
            b = self.input_batch([self._valid_context(r, catalogue, special) for r in chunk], special)
            ids, am = b["input_ids"].to(device), b["attention_mask"].to(device)
            users = self.base_users(ids, am)
            scores = self.base_scores(users).float().cpu()  # (b, N) the first stage
            target = np.array([catalogue.index[r["target_item_id"]] for r in chunk])
            seen = np.zeros(scores.shape, dtype=bool)
            for j, r in enumerate(chunk):
                seen[j, [catalogue.index[i] for i in r["seen_item_ids"]]] = True
            full = target_ranks(scores.numpy(), target, seen)
            shortlist = scores.masked_fill(torch.as_tensor(seen), float("-inf")).topk(min(top, scores.shape[1])).indices
            rescored = self.forward(ids, am, shortlist.to(device), users).float().cpu().numpy()  # (b, top)
            for j in range(len(chunk)):
                hit = np.flatnonzero(shortlist[j].numpy() == target[j])
                ranks.append(int(np.count_nonzero(rescored[j] >= rescored[j, hit[0]]) - 1) if len(hit) else int(full[j]))
        return ranks, f"two_stage_top{top}"
