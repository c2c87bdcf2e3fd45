"""The sequential baselines learn order where there is order, and choose their knobs on validation."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_ray.evaluate.sequential import (
    Markov,
    MarkovParams,
    SASRec,
    SASRecParams,
    ndcg10,
    tune_markov,
)

N_ITEMS = 60


def chains(users: int, length: int, seed: int = 0, noise: float = 0.1) -> list[np.ndarray]:
    """Each user walks i -> i + 1 (mod N_ITEMS) from a random start; ``noise`` of the steps jump to a
    random item. Never a repeat (the protocol leaves repeated targets out). Order is the whole
    signal: every item is about equally popular."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(users):
        s = [int(rng.integers(N_ITEMS))]
        for _ in range(length - 1):
            nxt = (s[-1] + 1) % N_ITEMS
            if nxt in s or rng.random() < noise:
                nxt = int(rng.choice(np.setdiff1d(np.arange(N_ITEMS), s)))
            s.append(nxt)
        out.append(np.array(s))
    return out


def split(seqs):
    """Leave-last-out: train = all but the last two, valid = the one before last, test = last."""
    return [s[:-2] for s in seqs], np.array([s[-2] for s in seqs]), [s[:-1] for s in seqs], np.array([s[-1] for s in seqs])


def test_markov_by_hand():
    # transitions 0->1 (twice), 0->2 (once), 1->2: P(1|0) = 2/3, P(2|0) = 1/3, P(2|1) = 1
    m = Markov([np.array([0, 1, 2]), np.array([0, 1]), np.array([0, 2])], 4, MarkovParams(backoff=0.0))
    np.testing.assert_allclose(m.scores([np.array([3, 0])]), [[0, 2 / 3, 1 / 3, 0]])
    # decay: the item before the last adds its transitions at weight decay; popularity back-off
    # is the train frequency (0: 3, 1: 2, 2: 2 of 7 events)
    d = m.with_params(MarkovParams(decay=0.5, backoff=0.7))
    np.testing.assert_allclose(d.scores([np.array([0, 1])]), [[0.3, 0.2 + 1 / 3, 1 + 0.5 / 3 + 0.2, 0]])
    # an item never followed by anything: popularity alone ranks, not all-zero ties
    assert np.argmax(m.with_params(MarkovParams(backoff=0.1)).scores([np.array([3])])[0]) == 0


def test_markov_finds_the_order_popularity_cannot_see_and_tunes_on_validation_only():
    train, valid_t, test_hist, test_t = split(chains(300, 20))
    best, curve = tune_markov(train, train, valid_t, N_ITEMS)
    assert len(curve) > 1 and curve[max(curve, key=curve.get)] == max(curve.values())
    m = Markov(test_hist, N_ITEMS, best)
    markov = ndcg10(m.scores(test_hist), test_t, test_hist)
    pop = ndcg10(np.tile(m.popularity, (len(test_hist), 1)), test_t, test_hist)
    assert markov > 0.6 and pop < 0.3, (markov, pop)


def test_sasrec_learns_the_order_and_keeps_its_best_validation_epoch():
    train, valid_t, test_hist, test_t = split(chains(200, 16))
    params = SASRecParams(max_len=12, hidden=32, max_epochs=30, eval_every=3, patience=3, lr=5e-3, dropout=0.1)
    m = SASRec(N_ITEMS, params).fit(train, train, valid_t)
    assert 0 < m.best_epoch <= m.epochs_run <= 30 and m.best_ndcg > 0.5, (m.best_epoch, m.best_ndcg)
    again = ndcg10(m.scores(train), valid_t, train)
    assert again == pytest.approx(m.best_ndcg, abs=1e-9)  # the kept weights are the best epoch's
    assert ndcg10(m.scores(test_hist), test_t, test_hist) > 0.5
    # the same seed, the same model
    m2 = SASRec(N_ITEMS, params).fit(train, train, valid_t)
    assert m2.best_epoch == m.best_epoch and m2.best_ndcg == pytest.approx(m.best_ndcg, abs=1e-6)


def test_sasrec_without_validation_trains_exactly_the_epochs_it_is_given():
    train, _, _, _ = split(chains(50, 10))
    m = SASRec(N_ITEMS, SASRecParams(max_len=8, hidden=16, max_epochs=3)).fit(train)
    assert m.epochs_run == 3 and m.best_epoch == 0 and m.scores(train[:2]).shape == (2, N_ITEMS)
