import zipfile

import pyarrow.compute as pc
import pytest

from recsys_ray.data.movielens import GENRES, RECBOLE_PREFIX, read_grouplens, read_recbole
from recsys_ray.errors import DataError


def write_grouplens_from_recbole(wheel, folder):
    """Build the official GroupLens layout (u.data, u.item, u.user; latin-1) from RecBole's files."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        inter, item, user = (zf.read(f"{RECBOLE_PREFIX}.{e}").decode("utf-8").splitlines()[1:] for e in ("inter", "item", "user"))
    with open(folder / "u.data", "w", encoding="latin-1") as f:
        for line in inter:
            u, i, r, t = line.split("\t")
            f.write(f"{u}\t{i}\t{int(float(r))}\t{int(float(t))}\n")
    with open(folder / "u.item", "w", encoding="latin-1") as f:
        for line in item:
            iid, title, year, classes = line.split("\t")
            if title == "unkonwn":
                title, date = "unknown", ""
            else:
                title, date = f"{title} ({year})", f"01-Jan-{year}"
            flags = ["1" if g in classes.split() else "0" for g in GENRES]
            f.write("|".join([iid, title, date, "", "http://example.invalid/", *flags]) + "\n")
    with open(folder / "u.user", "w", encoding="latin-1") as f:
        for line in user:
            f.write("|".join(line.split("\t")) + "\n")
    return folder


def test_recbole_wheel_holds_the_real_ml100k(recbole_wheel):
    t = read_recbole(recbole_wheel)
    ev, items, users = t["events"], t["items"], t["users"]
    assert ev.num_rows == 100_000 and items.num_rows == 1682 and users.num_rows == 943
    assert len(pc.unique(ev["user_id"])) == 943 and len(pc.unique(ev["item_id"])) == 1682
    first = ev.slice(0, 1).to_pylist()[0]
    assert first == {"user_id": "196", "item_id": "242", "rating": 3.0, "timestamp": 881250949}
    toy = items.slice(0, 1).to_pylist()[0]
    assert toy == {"item_id": "1", "title": "Toy Story (1995)", "year": "1995", "genres": "Animation, Children's, Comedy"}
    assert users.slice(0, 1).to_pylist()[0] == {"user_id": "1", "age": "24", "gender": "M", "occupation": "technician", "zip_code": "85711"}


@pytest.mark.parametrize("as_zip", [False, True])
def test_grouplens_layout_yields_identical_tables(recbole_wheel, tmp_path, as_zip):
    folder = write_grouplens_from_recbole(recbole_wheel, tmp_path / "ml-100k")
    path = folder
    if as_zip:
        path = tmp_path / "ml-100k.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name in ("u.data", "u.item", "u.user"):
                zf.write(folder / name, f"ml-100k/{name}")
    a, b = read_recbole(recbole_wheel), read_grouplens(path)
    for name in ("events", "items", "users"):
        assert a[name].equals(b[name]), name
    # non-ASCII titles survive the latin-1 round trip
    assert any("é" in t for t in b["items"]["title"].to_pylist())


def test_grouplens_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="MovieLens path not found"):
        read_grouplens(tmp_path / "nope")
    (tmp_path / "gl").mkdir()
    (tmp_path / "gl" / "u.data").write_text("1\t2\t3\t4\n")
    with pytest.raises(DataError, match="missing u.item, u.user"):
        read_grouplens(tmp_path / "gl")
    (tmp_path / "gl" / "u.item").write_text("1|x\n")
    (tmp_path / "gl" / "u.user").write_text("1|2|M|x|0\n")
    with pytest.raises(DataError, match="u.item: line 1 has 2 fields"):
        read_grouplens(tmp_path / "gl")
