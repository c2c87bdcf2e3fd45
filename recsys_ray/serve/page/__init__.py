"""The demo page the ingress serves at ``GET /demo``: pick a sample user (their recent history
shown with titles) or none, type a query or ask for recommendations, see the ranked items with
their scores. Plain HTML + JS (``index.html``), no build step; it calls the same routes as any
client (``/v1/search``, ``/v1/recommend``) and ``/demo/users`` for the sample users, read once
at start-up from a prepared data directory (``AppArgs.demo_data``)."""

from __future__ import annotations

from importlib import resources

from recsys_ray.data import layout
from recsys_ray.errors import ConfigError

RECENT = 5  # history titles shown per sample user


def page_html() -> str:
    return resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")


def sample_users(data: str, n: int = 12) -> list[dict]:
    """The first ``n`` users (by id) of a prepared data directory with at least 5 train events:
    ``{"user_id", "history" (train events, oldest first), "profile", "recent" (titles, newest first)}``."""
    if not layout.is_prepared(data):
        raise ConfigError([f"demo_data: {data} is not a prepared data directory (no manifest.json)"])
    items = layout.read_items(data)
    title_col = "title" if "title" in items.column_names else "text"
    titles = dict(zip(items["item_id"].to_pylist(), items[title_col].to_pylist(), strict=True))
    cols = ["user_id", "item_ids", "n_train"]
    if "profile_text" in layout.columns(data, layout.SEQUENCES):
        cols.append("profile_text")
    rows = [r for r in layout.read_sequences(data, cols).to_pylist() if r["n_train"] >= 5]
    rows.sort(key=lambda r: (len(r["user_id"]), r["user_id"]))  # "2" before "10"
    out = []
    for r in rows[:n]:
        history = list(r["item_ids"][: r["n_train"]])
        out.append({"user_id": r["user_id"], "history": history, "profile": r.get("profile_text"),
                    "recent": [str(titles.get(i, i)) for i in reversed(history[-RECENT:])]})
    return out
