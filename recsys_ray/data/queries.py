"""Search queries for logs without query text, generated from the target item's metadata.

MovieLens-100K has no queries. As the personalised product-search literature does for logs
without query text (Van Gysel et al. 2016; Ai et al. 2017, HEM), each event gets a query built
from the acted-on item's *metadata, never its title*: its genres and its release decade, through
a few templates ("90s comedy", "a crime thriller from the 1970s", "romantic drama"). The template
and the genres are drawn per event with a generator seeded by (seed, user, item, timestamp), so
the same event always gets the same query. Many films match each query (a genre x decade has
tens to hundreds), so the query narrows the catalogue and the user's history decides within it.

:func:`query_attributes` reads the genres and the decade back from any query text, and
:func:`matching_items` lists the catalogue items whose metadata match them (the query-filtered
popularity baseline, and the "items per query" numbers of docs/quality.md).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

# MovieLens genre -> the words a query uses for it (the first is the one generated)
GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "Action": ("action",), "Adventure": ("adventure",), "Animation": ("animated", "animation"),
    "Children's": ("family", "children's", "kids"), "Comedy": ("comedy", "comedies"), "Crime": ("crime",),
    "Documentary": ("documentary",), "Drama": ("drama",), "Fantasy": ("fantasy",),
    "Film-Noir": ("film noir", "noir"), "Horror": ("horror",), "Musical": ("musical",),
    "Mystery": ("mystery",), "Romance": ("romantic", "romance"), "Sci-Fi": ("sci-fi", "science fiction"),
    "Thriller": ("thriller",), "War": ("war",), "Western": ("western",),
}  # fmt: skip
# {g1}/{g2}: genre words, {short}: "90s", {long}: "1990s"; a template applies when its slots can be filled
TEMPLATES = (
    "{short} {g1}",
    "a {g1} {g2} from the {long}",
    "{g1} {g2}",
    "{g1} movie",
    "{g1} from the {long}",
    "{long} {g1} film",
)
_WORD_TO_GENRE = sorted(((w, g) for g, ws in GENRE_WORDS.items() for w in ws), key=lambda x: -len(x[0]))
_DECADE = re.compile(r"\b(?:(1[89]|20)?(\d)0)'?s\b")
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def decade_of(year: str | int | None) -> int | None:
    """1995 -> 1990; None for an empty or unparseable year."""
    try:
        return int(str(year).strip()[:4]) // 10 * 10
    except (TypeError, ValueError):
        return None


def event_query(genres: Sequence[str], decade: int | None, rng: np.random.Generator) -> str:
    """One query for an item with these genres and release decade."""
    genres = [g for g in genres if g in GENRE_WORDS]
    order = list(rng.permutation(len(genres))) if genres else []
    g1 = GENRE_WORDS[genres[order[0]]][0] if genres else None
    g2 = GENRE_WORDS[genres[order[1]]][0] if len(genres) > 1 else None
    slots = {"g1": g1, "g2": g2, "short": f"{decade % 100:02d}s" if decade is not None else None,
             "long": f"{decade}s" if decade is not None else None}
    usable = [t for t in TEMPLATES if all(slots[s] for s in re.findall(r"\{(\w+)\}", t))]
    if not usable:
        return "a movie"
    return usable[int(rng.integers(len(usable)))].format(**slots)


def metadata_queries(events: pa.Table, items: pa.Table, seed: int) -> pa.Array:
    """A query per event of the MovieLens ``events`` (user_id, item_id, timestamp) from ``items``'
    ``genres`` ("Comedy, Drama") and ``year``."""
    meta = {
        iid: ([g.strip() for g in (gs or "").split(",") if g.strip()], decade_of(y))
        for iid, gs, y in zip(items["item_id"].to_pylist(), items["genres"].to_pylist(), items["year"].to_pylist(),
                              strict=True)
    }
    out = []
    for user, item, ts in zip(events["user_id"].to_pylist(), events["item_id"].to_pylist(),
                              events["timestamp"].to_pylist(), strict=True):
        rng = np.random.default_rng([seed, zlib.crc32(f"{user}\t{item}\t{ts}".encode())])
        genres, decade = meta.get(item, ([], None))
        out.append(event_query(genres, decade, rng))
    return pa.array(out, pa.string())


def query_attributes(query: str) -> tuple[frozenset[str], int | None]:
    """(genres, decade) a query names: ``"a crime thriller from the 1970s"`` -> ({Crime, Thriller}, 1970)."""
    text = " " + query.lower() + " "
    genres = set()
    for word, genre in _WORD_TO_GENRE:  # longest words first: "film noir" before "noir"
        pattern = r"(?<![\w-])" + re.escape(word) + r"(?![\w-])"
        if re.search(pattern, text):
            genres.add(genre)
            text = re.sub(pattern, " ", text)
    m = _DECADE.search(text)
    decade = None
    if m:
        century = m.group(1)
        decade = (int(century) * 100 if century else 1900) + int(m.group(2)) * 10
    return frozenset(genres), decade


def item_attributes(genres: str | None, title: str | None) -> tuple[frozenset[str], int | None]:
    """(genres, decade) of a catalogue row: ``genres`` text ("Comedy, Drama"), year from the title's "(1995)"."""
    m = _YEAR.search(title or "")
    return frozenset(g.strip() for g in (genres or "").split(",") if g.strip()), decade_of(m.group(1)) if m else None


def matching_items(query: str, item_attrs: Sequence[tuple[frozenset[str], int | None]]) -> np.ndarray:
    """Catalogue rows whose metadata match every attribute the query names (all rows if it names none)."""
    genres, decade = query_attributes(query)
    return np.array([r for r, (g, d) in enumerate(item_attrs) if genres <= g and (decade is None or decade == d)],
                    dtype=np.int64)
