"""MovieLens-100K from two layouts that must agree row for row.

(a) RecBole atomic files inside the PyPI wheel ``recbole==1.2.1``
    (``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``), fetched with
    ``pip download --no-deps`` into a cache and read straight from the wheel (recbole itself is
    never installed);
(b) the official GroupLens layout (``u.data`` tab-separated, ``u.item`` / ``u.user`` /
    ``u.genre`` pipe-separated latin-1), from a folder or the ``ml-100k.zip``.

Both yield the same canonical tables: events ``user_id, item_id, rating, timestamp`` in file
order; items ``item_id, title, year, genres`` where ``title`` carries the year as GroupLens
writes it (``Toy Story (1995)``); users ``user_id, age, gender, occupation, zip_code``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from recsys_ray.errors import DataError

log = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
# GroupLens u.genre order (the 19 flag columns of u.item)
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip
ITEM_TEXT_COLUMNS = ["title", "genres"]
USER_PROFILE_COLUMNS = ["age", "gender", "occupation"]
_TITLE_YEAR = re.compile(r"^(.*) \(([^()]*)\)$")


def default_cache_dir() -> Path:
    """``$RECSYS_RAY_CACHE`` or ``~/.cache/recsys_ray``."""
    return Path(os.environ.get("RECSYS_RAY_CACHE") or Path.home() / ".cache" / "recsys_ray")


def fetch_recbole_wheel(cache_dir: str | Path | None = None) -> Path:
    """The RecBole wheel in the cache, downloaded with ``pip download --no-deps`` if absent."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    wheel = cache / RECBOLE_WHEEL
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s", RECBOLE_REQUIREMENT, cache)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(cache), RECBOLE_REQUIREMENT]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {RECBOLE_REQUIREMENT} into {cache}: {last}")
    return wheel


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_atomic(data: bytes, name: str) -> pa.Table:
    """RecBole atomic file: tab-separated, header ``field:type``; every column read as text."""
    header = data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r").split("\t")
    names = [h.split(":", 1)[0] for h in header]
    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=names),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"{name}: cannot parse ({exc})") from None


def read_recbole(wheel: str | Path) -> dict[str, pa.Table]:
    """Canonical ``events``, ``items``, ``users`` tables from the RecBole wheel."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{wheel}: not a readable wheel ({exc})") from None
    with zf:
        def member(ext: str) -> bytes:
            name = f"{RECBOLE_PREFIX}.{ext}"
            try:
                return zf.read(name)
            except KeyError:
                raise DataError(f"{wheel}: missing {name}") from None

        inter = _read_atomic(member("inter"), "ml-100k.inter")
        item = _read_atomic(member("item"), "ml-100k.item")
        user = _read_atomic(member("user"), "ml-100k.user")

    titles, years = [], []
    for title, year in zip(item["movie_title"].to_pylist(), item["release_year"].to_pylist(), strict=True):
        if title == "unkonwn":  # RecBole's spelling of GroupLens' title-less item 267
            titles.append("unknown")
            years.append("")
        else:
            titles.append(f"{title} ({year})" if year else title)
            years.append(year or "")
    genres = [", ".join((g or "").split()) for g in item["class"].to_pylist()]
    return {
        "events": pa.table(
            {
                "user_id": inter["user_id"],
                "item_id": inter["item_id"],
                "rating": inter["rating"].cast(pa.float64()),
                "timestamp": inter["timestamp"].cast(pa.float64()).cast(pa.int64()),
            }
        ),
        "items": pa.table(
            {"item_id": item["item_id"], "title": titles, "year": years, "genres": genres}
        ),
        "users": pa.table({c: user[c] for c in ["user_id", "age", "gender", "occupation", "zip_code"]}),
    }


def _grouplens_files(path: str | Path) -> dict[str, bytes]:
    p = Path(path)
    wanted = ("u.data", "u.item", "u.user")
    out: dict[str, bytes] = {}
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            for name in zf.namelist():
                base = name.rsplit("/", 1)[-1]
                if base in wanted and base not in out:
                    out[base] = zf.read(name)
    elif p.is_dir():
        for base in wanted:
            if (p / base).is_file():
                out[base] = (p / base).read_bytes()
    else:
        raise DataError(f"MovieLens path not found: {p} (a folder with u.data/u.item/u.user or ml-100k.zip)")
    missing = [w for w in wanted if w not in out]
    if missing:
        raise DataError(f"{p}: missing {', '.join(missing)} (GroupLens ml-100k layout)")
    return out


def _split_lines(data: bytes, encoding: str, sep: str, ncols: int, name: str) -> list[list[str]]:
    rows = []
    for lineno, line in enumerate(data.decode(encoding).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) != ncols:
            raise DataError(f"{name}: line {lineno} has {len(parts)} fields, expected {ncols}")
        rows.append(parts)
    return rows


def read_grouplens(path: str | Path) -> dict[str, pa.Table]:
    """Canonical ``events``, ``items``, ``users`` tables from GroupLens ``u.*`` files."""
    files = _grouplens_files(path)
    data = _split_lines(files["u.data"], "latin-1", "\t", 4, "u.data")
    items = _split_lines(files["u.item"], "latin-1", "|", 5 + len(GENRES), "u.item")
    users = _split_lines(files["u.user"], "latin-1", "|", 5, "u.user")
    titles, years, genres = [], [], []
    for row in items:
        title = row[1]
        m = _TITLE_YEAR.match(title)
        titles.append(title)
        years.append(m.group(2) if m else "")
        flags = row[5:]
        genres.append(", ".join(g for g, f in zip(GENRES, flags, strict=True) if f.strip() == "1"))
    return {
        "events": pa.table(
            {
                "user_id": [r[0] for r in data],
                "item_id": [r[1] for r in data],
                "rating": pa.array([float(r[2]) for r in data], pa.float64()),
                "timestamp": pa.array([int(r[3]) for r in data], pa.int64()),
            }
        ),
        "items": pa.table(
            {"item_id": [r[0] for r in items], "title": titles, "year": years, "genres": genres}
        ),
        "users": pa.table(
            {
                "user_id": [r[0] for r in users],
                "age": [r[1] for r in users],
                "gender": [r[2] for r in users],
                "occupation": [r[3] for r in users],
                "zip_code": [r[4] for r in users],
            }
        ),
    }


def load_movielens(movielens_path: str | None, cache_dir: str | None) -> tuple[dict[str, pa.Table], dict]:
    """Tables plus a description of the source (for the manifest and the fingerprint)."""
    if movielens_path:
        tables = read_grouplens(movielens_path)
        files = _grouplens_files(movielens_path)
        digest = hashlib.sha256(b"".join(files[k] for k in sorted(files))).hexdigest()
        return tables, {"layout": "grouplens", "path": str(movielens_path), "sha256": digest}
    wheel = fetch_recbole_wheel(cache_dir)
    tables = read_recbole(wheel)
    return tables, {"layout": "recbole", "wheel": str(wheel), "sha256": sha256_file(wheel)}
