"""The model file: config checks, freeze strategies, checkpoints, batch building, a toy fit.

Everything but the one ``slow`` test uses a tiny random BERT (hidden 32, 2 layers) with the
MiniLM tokenizer read from site-packages: no network.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import pytest
import torch

from recsys_ray.checkpoint import read_meta
from recsys_ray.errors import ConfigError, RecsysError
from recsys_ray.model.base import BertRecommender
from recsys_ray.model.config import ModelConfig, parse_freeze
from recsys_ray.model.encoder import apply_freeze
from recsys_ray.model.kinds import config_problems, from_config, load_model
from recsys_ray.model.kinds.text_ranker import build_pair_batch
from recsys_ray.model.kinds.text_retriever import build_single_batch
from recsys_ray.model.losses import compute_loss, in_batch_softmax
from recsys_ray.model.tokenizer import load_tokenizer, resolve_encoder_path, special_ids

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
FREEZES = ["none", "embeddings", "bottom:1", "encoder", "lora:4"]
TOKENS = list(range(2000, 2100))  # ordinary word pieces of the MiniLM vocabulary


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models gain nothing from intra-op threads, and on a busy 2-core box they make
    # run times erratic
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


def tiny(tokenizer, kind="ranker", freeze="none", seed=0, **kw) -> BertRecommender:
    torch.manual_seed(seed)
    return from_config(ModelConfig(kind=kind, freeze=freeze, tiny=TINY, **kw), tokenizer)


def random_lists(rng: random.Random, n: int, lo: int, hi: int) -> list[list[int]]:
    return [[rng.choice(TOKENS) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def ranker_batch(tokenizer, seed=0, rows=4, candidates=3):
    rng = random.Random(seed)
    contexts = random_lists(rng, rows, 3, 8)
    items = random_lists(rng, rows * candidates, 1, 4)
    return build_pair_batch(
        [c for c in contexts for _ in range(candidates)], items, special_ids(tokenizer)
    )


def retriever_batches(tokenizer, seed=0, rows=4):
    rng = random.Random(seed)
    special = special_ids(tokenizer)
    return (build_single_batch(random_lists(rng, rows, 3, 8), special),
            build_single_batch(random_lists(rng, rows, 1, 4), special))


def scores_of(model: BertRecommender, tokenizer, seed=0) -> torch.Tensor:
    """Ranker: (4, 3) logits; retriever: (4, 4) user x item scores."""
    if model.cfg.kind == "ranker":
        return model(**ranker_batch(tokenizer, seed)).view(4, 3)
    users, items = retriever_batches(tokenizer, seed)
    return model.score(model(**users), model(**items))


def train_step(model: BertRecommender, tokenizer, lr=1e-2) -> None:
    """One AdamW step on a random batch; the optimizer sees EVERY parameter, frozen ones included."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    scores = scores_of(model, tokenizer, seed=1)
    if model.cfg.kind == "ranker":
        loss = compute_loss("softmax", scores)
    else:
        loss = in_batch_softmax(scores, torch.arange(scores.shape[0]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()


# ---------------------------------------------------------------------------------------------
# config


def test_valid_configs_have_no_problems():
    for kind in ("ranker", "retriever"):
        for freeze in FREEZES + ["bottom:2", "lora:16"]:
            assert config_problems(ModelConfig(kind=kind, freeze=freeze, tiny=TINY)) == []
    assert config_problems(ModelConfig()) == []


def test_problems_lists_every_bad_field_at_once():
    cfg = ModelConfig(
        kind="tower", freeze="bottom", temperature=0.0, dropout=1.5, lora_dropout=-0.1,
        tiny={"hidden_size": 30, "num_attention_heads": 4, "vocab_size": 10, "num_layers": 2},
    )
    problems = config_problems(cfg)
    expected = ["model.kind", "model.freeze", "model.temperature", "model.dropout",
                "model.lora_dropout", "model.tiny.vocab_size", "model.tiny.num_layers",
                "multiple of num_attention_heads"]
    for fragment in expected:
        assert sum(fragment in p for p in problems) == 1, (fragment, problems)
    assert len(problems) == len(expected)
    with pytest.raises(ConfigError) as err:
        from_config(cfg)
    assert err.value.problems == problems


def test_parse_freeze():
    assert parse_freeze("none") == ("none", 0)
    assert parse_freeze("bottom:3") == ("bottom", 3)
    assert parse_freeze("lora:8") == ("lora", 8)
    for bad in ("lora:0", "bottom:-1", "top:1", "Encoder", ""):
        with pytest.raises(ConfigError):
            parse_freeze(bad)


def test_bottom_k_must_fit_the_encoder(tokenizer):
    assert any("only 2 layers" in p for p in config_problems(ModelConfig(freeze="bottom:3", tiny=TINY)))
    model = tiny(tokenizer)
    assert apply_freeze(model, "bottom:2")["trainable"] == 33  # K = all layers: the head only
    with pytest.raises(ConfigError, match="only 2 layers"):
        apply_freeze(model, "bottom:3")


# ---------------------------------------------------------------------------------------------
# freeze strategies


def expected_frozen(name: str, spec: str) -> bool:
    kind, k = parse_freeze(spec)
    in_encoder = name.startswith("encoder.")
    if kind == "none":
        return False
    if kind == "embeddings":
        return name.startswith("encoder.embeddings.")
    if kind == "bottom":
        lower = tuple(f"encoder.encoder.layer.{i}." for i in range(k))
        return name.startswith("encoder.embeddings.") or name.startswith(lower)
    if kind == "encoder":
        return in_encoder
    return in_encoder and "lora_" not in name  # lora


@pytest.mark.parametrize("kind", ["ranker", "retriever"])
@pytest.mark.parametrize("freeze", FREEZES)
def test_one_step_changes_exactly_the_trainable_parameters(tokenizer, kind, freeze):
    model = tiny(tokenizer, kind, freeze)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, tokenizer)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in before if expected_frozen(n, freeze)}
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), f"frozen {name} moved"
        else:
            assert not torch.equal(p, before[name]), f"trainable {name} did not move"


@pytest.mark.parametrize("kind", ["ranker", "retriever"])
def test_trainable_counts_shrink_with_stronger_freezing(tokenizer, kind):
    counts = {spec: tiny(tokenizer, kind, spec).trainable_parameters() for spec in FREEZES}
    assert counts["none"] > counts["embeddings"] > counts["bottom:1"] > counts["encoder"] > 0
    h = TINY["hidden_size"]
    # encoder frozen: only the head trains; ranker Linear(H, 1), retriever Linear(H, H)
    assert counts["encoder"] == (h + 1 if kind == "ranker" else h * h + h)
    # LoRA rank 4 on q, k, v of 2 layers: A (4 x H) + B (H x 4) each, plus the head
    assert counts["lora:4"] == 2 * 3 * (4 * h + h * 4) + counts["encoder"]
    assert counts["lora:4"] * 100 < counts["none"]
    model = tiny(tokenizer, kind, "none")
    assert model.trainable_parameters() == model.total_parameters() == counts["none"]


def test_lora_starts_as_the_base_model_and_rejects_another_spec(tokenizer):
    model = tiny(tokenizer)
    base_scores = scores_of(model, tokenizer)
    info = apply_freeze(model, "lora:4")  # B = 0 at init: adapters add nothing yet
    assert info["spec"] == model.cfg.freeze == "lora:4"
    assert torch.equal(scores_of(model, tokenizer), base_scores)
    with pytest.raises(ConfigError, match="already carries LoRA"):
        apply_freeze(model, "none")


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("kind,freeze", [("ranker", "none"), ("retriever", "none"),
                                         ("ranker", "lora:4"), ("retriever", "lora:4")])
def test_checkpoint_reproduces_scores_without_the_original_encoder(tokenizer, tmp_path, kind, freeze):
    # the encoder folder holds only config + tokenizer; it is deleted before loading
    encoder_dir = tmp_path / "encoder"
    encoder_dir.mkdir()
    src = Path(resolve_encoder_path("default"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, encoder_dir / name)
    model = tiny(tokenizer, kind, freeze, encoder=str(encoder_dir))
    fresh_scores = scores_of(model, tokenizer)
    train_step(model, tokenizer)  # moves the head and, for LoRA, makes B non-zero
    with torch.no_grad():
        scores = scores_of(model, tokenizer)
    assert not torch.allclose(scores, fresh_scores)

    extra = {"step": 7, "metrics": {"ndcg@10": 0.25}, "fingerprint": "abc"}
    ckpt = model.save(tmp_path / "ckpt", extra=extra)
    shutil.rmtree(encoder_dir)
    assert {"model.safetensors", "config.json", "recsys_ray.json", "tokenizer.json"} <= {
        p.name for p in ckpt.iterdir()}
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))  # never pickle

    loaded = load_model(ckpt)
    assert not loaded.training
    with torch.no_grad():
        assert torch.allclose(scores_of(loaded, tokenizer), scores, rtol=0, atol=0)
    assert loaded.cfg == model.cfg
    assert loaded.extra == extra
    assert read_meta(ckpt)["extra"] == extra
    # the freeze strategy is restored too, so training resumes on the same parameters
    assert loaded.trainable_parameters() == model.trainable_parameters()
    assert loaded.tokenizer("a b").input_ids == tokenizer("a b").input_ids


def test_broken_checkpoints_raise_one_line_errors_naming_the_path(tokenizer, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RecsysError, match="checkpoint directory not found") as err:
        load_model(missing)
    assert str(missing) in str(err.value)

    ckpt = tiny(tokenizer).save(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    for bad in (b"this is not a safetensors file", good[: len(good) // 2]):
        weights.write_bytes(bad)
        with pytest.raises(RecsysError, match="unreadable safetensors") as err:
            load_model(ckpt)
        assert str(weights) in str(err.value) and "\n" not in str(err.value)
    weights.write_bytes(good)
    load_model(ckpt)  # sanity: the intact file loads

    (ckpt / "recsys_ray.json").unlink()
    with pytest.raises(RecsysError, match="missing recsys_ray.json") as err:
        load_model(ckpt)
    assert str(ckpt) in str(err.value)


def test_save_refuses_an_extra_that_is_not_json(tokenizer, tmp_path):
    with pytest.raises(RecsysError, match="JSON"):
        tiny(tokenizer).save(tmp_path / "ckpt", extra={"when": object()})
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------
# batches


CONTEXTS = [
    "age: 24 | gender: M | history: Toy Story (1995), GoldenEye (1995), Four Rooms (1995)",
    "age: 53 | gender: F",
    "history: Star Wars (1977)",
]
ITEMS = [
    "Copycat (1995) | genres: Crime, Drama, Thriller",
    "Twelve Monkeys (1995) | genres: Drama, Sci-Fi",
    "Babe (1995)",
]


@pytest.mark.parametrize("max_length", [None, 64, 24, 18])
def test_pair_batch_equals_the_tokenizer_on_text(tokenizer, max_length):
    ctx_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in CONTEXTS]
    item_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ITEMS]
    ours = build_pair_batch(ctx_ids, item_ids, special_ids(tokenizer), max_length)
    theirs = tokenizer(CONTEXTS, ITEMS, truncation="only_first", max_length=max_length,
                       padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ours[key], theirs[key]), key
    if max_length == 18:  # contexts really were cut (27 and 7 tokens), the 13-token items were not
        assert ours["attention_mask"].sum(1).max().item() == 18


@pytest.mark.parametrize("max_length", [None, 8])
def test_single_batch_equals_the_tokenizer_on_text(tokenizer, max_length):
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ITEMS]
    ours = build_single_batch(ids, special_ids(tokenizer), max_length)
    theirs = tokenizer(ITEMS, truncation=max_length is not None, max_length=max_length,
                       padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ours[key], theirs[key]), key


def test_pair_batch_cuts_the_item_only_when_an_empty_context_is_not_enough():
    batch = build_pair_batch([[7, 8]], [[3, 4, 5]], (1, 2, 0), max_length=5)
    # 2 + 3 + 3 specials = 8 > 5: the context goes entirely (2), then one item token
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 2]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 1, 1]]


def test_padding_does_not_change_scores(tokenizer):
    ranker, retriever = tiny(tokenizer), tiny(tokenizer, "retriever")
    special = special_ids(tokenizer)
    short, long = [2000, 2001], [2002] * 20
    with torch.no_grad():
        alone = ranker(**build_pair_batch([short], [[2005]], special))
        padded = ranker(**build_pair_batch([short, long], [[2005], [2006]], special))
        assert torch.allclose(alone[0], padded[0], atol=1e-5)
        vec_alone = retriever(**build_single_batch([short], special))
        vec_padded = retriever(**build_single_batch([short, long], special))
        assert torch.allclose(vec_alone[0], vec_padded[0], atol=1e-5)  # mean pooling skips padding
        # unit vectors: a vector scores 1 / temperature against itself
        assert torch.allclose(retriever.score(vec_padded, vec_padded).diagonal(),
                              torch.full((2,), 1 / retriever.cfg.temperature), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# learning


def test_tiny_ranker_learns_to_pick_the_candidate_sharing_a_token(tokenizer):
    """Toy task: the positive repeats the context's token, the 3 negatives are other tokens."""
    vocab = TOKENS[:8]
    special = special_ids(tokenizer)

    def batch(rng: random.Random, rows: int):
        contexts, items = [], []
        for _ in range(rows):
            word, *negatives = rng.sample(vocab, 4)
            for candidate in [word, *negatives]:
                contexts.append([word])
                items.append([candidate])
        return build_pair_batch(contexts, items, special)

    def held_out():
        model.eval()
        with torch.no_grad():
            scores = model(**held_out_batch).view(64, 4)
        return compute_loss("softmax", scores).item(), (scores.argmax(1) == 0).float().mean().item()

    # dropout off: in 120 steps it only slows a task with no noise to regularise against
    no_dropout = {**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    model = from_config(ModelConfig(dropout=0.0, tiny=no_dropout), tokenizer)
    rng = random.Random(0)
    held_out_batch = batch(random.Random(123), 64)
    loss_before, _ = held_out()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(120):
        model.train()
        loss = compute_loss("softmax", model(**batch(rng, 16)).view(16, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_after, accuracy = held_out()
    assert loss_before == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.01)  # uniform
    assert loss_after < 0.5 * loss_before
    assert accuracy > 0.75  # chance is 0.25


# ---------------------------------------------------------------------------------------------
# where the encoder comes from


def test_resolve_encoder_path(tmp_path, tokenizer):
    default = Path(resolve_encoder_path("default"))
    assert (default / "config.json").is_file() and (default / "model.safetensors").is_file()
    assert resolve_encoder_path(str(default)) == str(default)
    # hub names pass through untouched (resolved by from_pretrained where a network exists)
    assert resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(RecsysError, match="directory not found"):
        resolve_encoder_path(str(tmp_path / "missing"))
    with pytest.raises(RecsysError, match="no config.json"):
        resolve_encoder_path(str(tmp_path))
    # a checkpoint is not an encoder: loading its prefixed weights as a BertModel would be random
    ckpt = tiny(tokenizer).save(tmp_path / "ckpt")
    with pytest.raises(RecsysError, match="is a recsys_ray checkpoint, not a BERT folder"):
        from_config(ModelConfig(encoder=str(ckpt)))


def test_s3_encoder_is_copied_to_the_cache_once(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    import pyarrow.fs

    server = moto_server.ThreadedMotoServer(port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                           "RECSYS_RAY_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="models")
        fs, _ = pyarrow.fs.FileSystem.from_uri("s3://models/minilm")
        src = Path(resolve_encoder_path("default"))
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            with fs.open_output_stream(f"models/minilm/{name}") as out:
                out.write((src / name).read_bytes())

        local = Path(resolve_encoder_path("s3://models/minilm"))
        assert local.parent == tmp_path / "cache" / "models"
        assert (local / "config.json").read_bytes() == (src / "config.json").read_bytes()
        assert load_tokenizer("s3://models/minilm")("hello").input_ids == [101, 7592, 102]
        fs.delete_dir("models/minilm")  # a second resolve must not need the bucket
        assert resolve_encoder_path("s3://models/minilm") == str(local)
        with pytest.raises(RecsysError, match="no such folder"):
            resolve_encoder_path("s3://models/other")
    finally:
        server.stop()


def _truncate_weights(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def _drop_tokenizer(ckpt: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)


def _edit_json(name: str, change):
    def damage(ckpt: Path) -> None:
        import json

        doc = json.loads((ckpt / name).read_text())
        change(doc)
        (ckpt / name).write_text(json.dumps(doc))
    return damage


@pytest.mark.parametrize("damage, message", [
    (_truncate_weights, r"model\.safetensors: unreadable safetensors"),
    (lambda c: (c / "model.safetensors").unlink(), r"not a recsys_ray checkpoint \(missing model\.safetensors\)"),
    (_drop_tokenizer, "cannot read config or tokenizer"),
    (_edit_json("recsys_ray.json", lambda d: d.update(format_version=2)), r"unknown checkpoint format \(expected format_version 1\)"),
    (_edit_json("recsys_ray.json", lambda d: d["model_config"].update(new_field=1)), r"unknown model_config keys \['new_field'\]"),
    (_edit_json("recsys_ray.json", lambda d: d["model_config"].update(kind="classifier")), "invalid model_config"),
    (_edit_json("config.json", lambda d: d.update(hidden_size=64, intermediate_size=64)), "weights do not match the saved config"),
    (lambda c: (c / "recsys_ray.json").write_text("{not json"), r"recsys_ray\.json: unreadable"),
])
def test_a_damaged_checkpoint_fails_at_load_with_the_reason(tokenizer, tmp_path, damage, message):
    ckpt = tiny(tokenizer, "retriever").save(tmp_path / "ckpt")
    load_model(ckpt)  # intact: loads
    damage(ckpt)
    with pytest.raises(RecsysError, match=message) as err:
        load_model(ckpt)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# the real pretrained encoder


@pytest.mark.slow
def test_packaged_minilm_loads_and_embeds_sentences_sensibly(tokenizer):
    from transformers import BertModel

    retriever = from_config(ModelConfig(kind="retriever"), tokenizer)
    assert isinstance(retriever.encoder, BertModel)
    assert retriever.encoder.config.num_hidden_layers == 6
    assert len(retriever.encoder.encoder.layer) == 6
    assert retriever.encoder.config.hidden_size == 384
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        vecs = retriever(**build_single_batch(ids, special_ids(tokenizer)))  # (3, 384)
        scores = retriever.score(vecs[:1], vecs[1:])[0]
    # pretrained weights, not random ones: the paraphrase is clearly closer than the other sentence
    assert scores[0] > scores[1] + 0.1 / retriever.cfg.temperature

    ranker = from_config(dataclasses.replace(ModelConfig(), freeze="lora:8"), tokenizer)
    with torch.no_grad():
        logits = ranker(**build_pair_batch(ids[:1] * 2, ids[1:], special_ids(tokenizer)))
    assert torch.isfinite(logits).all() and logits[0] != logits[1]
