"""Locating and reading tabular files (parquet / csv / jsonl) on local disk or ``s3://``.

Paths and URIs are opened through :func:`recsys_ray.storage.filesystem` (S3 credentials from the
standard AWS chain, ``AWS_ENDPOINT_URL`` for S3-compatible stores).
"""

from __future__ import annotations

import codecs
import fnmatch
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys_ray.errors import DataError, one_line
from recsys_ray.storage import describe, filesystem

FORMATS = ("parquet", "csv", "jsonl")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}


@dataclass(frozen=True)
class FileRef:
    """One input file: a URI that every Ray worker can open, and its format."""

    uri: str
    format: str
    size: int
    mtime_ns: int


def _join(uri: str, fs_path: str) -> str:
    return "s3://" + fs_path if uri.startswith("s3://") else fs_path


def detect_format(path: str, fmt: str = "auto") -> str:
    """Format from the extension (``.csv``, ``.parquet``, ``.jsonl`` ...), unless given."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise DataError(f"{path}: cannot tell the file format from the extension; set format:")
    return _EXTENSIONS[ext]


def list_files(uri: str, fmt: str = "auto") -> list[FileRef]:
    """Expand a file, a folder (recursively) or a glob into a sorted list of data files."""
    try:
        return _list_files(uri, fmt)
    except OSError as exc:  # unreachable store, denied access: one line naming the URI
        raise DataError(describe(exc, uri)) from None


def _list_files(uri: str, fmt: str) -> list[FileRef]:
    fs, path = filesystem(uri)
    has_glob = any(c in path for c in "*?[")
    if has_glob:
        parts = path.split("/")
        first_glob = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        base = "/".join(parts[:first_glob]) or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        infos = [
            i for i in infos
            if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path) and not _hidden(i.path)
        ]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"input not found: {uri}")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            infos = [
                i
                for i in infos
                if i.type == pafs.FileType.File
                and not _hidden(i.path)
                and (fmt != "auto" or _has_known_extension(i.path))
            ]
    if not infos:
        raise DataError(f"no input files match {uri}")
    infos.sort(key=lambda i: i.path)
    return [
        FileRef(
            uri=_join(uri, i.path),
            format=detect_format(i.path, fmt),
            size=int(i.size or 0),
            mtime_ns=int(i.mtime_ns or 0),
        )
        for i in infos
    ]


def _hidden(path: str) -> bool:
    """Spark/Ray markers and dot-files (``_SUCCESS``, ``.crc``) are not data."""
    return os.path.basename(path).startswith((".", "_"))


def _has_known_extension(path: str) -> bool:
    try:
        detect_format(path)
        return True
    except DataError:
        return False


def _open(uri: str, random_access: bool = False):
    fs, path = filesystem(uri)
    try:
        # parquet needs seeks (footer first); text formats stream, decompressing by extension
        return fs.open_input_file(path) if random_access else fs.open_input_stream(path)
    except FileNotFoundError:
        raise DataError(f"input not found: {uri}") from None


def _csv_delimiter(uri: str) -> str:
    return "\t" if uri.lower().rstrip(".gz").endswith(".tsv") else ","


def read_columns(ref: FileRef, sample_lines: int = 100) -> list[str]:
    """Column names of a file, cheaply (parquet footer, csv header, first jsonl records)."""
    try:
        if ref.format == "parquet":
            with _open(ref.uri, random_access=True) as f:
                return list(pq.ParquetFile(f).schema_arrow.names)
        if ref.format == "csv":
            with _open(ref.uri) as f:
                reader = pacsv.open_csv(
                    f,
                    parse_options=pacsv.ParseOptions(delimiter=_csv_delimiter(ref.uri)),
                    convert_options=pacsv.ConvertOptions(),
                    read_options=pacsv.ReadOptions(block_size=1 << 16),
                )
                return list(reader.schema.names)
        names: dict[str, None] = {}
        with _open(ref.uri) as f:
            for i, line in enumerate(_iter_lines(f)):
                if i >= sample_lines:
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    names.update(dict.fromkeys(record))
        return list(names)
    except DataError:
        raise
    except OSError as exc:
        raise DataError(describe(exc, ref.uri)) from None
    except pa.ArrowInvalid as exc:
        raise DataError(f"{ref.uri}: cannot read ({one_line(exc)})") from None


def _iter_lines(stream) -> Iterator[bytes]:
    buf = b""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def not_utf8(data: bytes) -> str | None:
    """Why ``data`` is not UTF-8 (``not UTF-8 (byte 0xff at offset 3)``), or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
    return None


def iter_record_batches(
    ref: FileRef, columns: list[str], batch_rows: int = 65_536
) -> Iterator[tuple[pa.Table, list[tuple[int, str, str]]]]:
    """Stream a file as tables holding ``columns`` as strings-or-native, plus malformed rows.

    Yields ``(table, malformed)`` where ``table`` carries a ``__row`` column (0-based data row
    within the file, so the source order survives any later shuffle) and ``malformed`` lists
    ``(row, reason_detail, raw_text)`` for rows that could not be parsed at all.
    Columns absent from a jsonl record come back as nulls (the validator rejects the row).
    """
    if ref.format == "parquet":
        with _open(ref.uri, random_access=True) as f:
            pf = pq.ParquetFile(f)
            start = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                t = pa.Table.from_batches([batch])
                yield t.append_column("__row", pa.array(range(start, start + len(t)), pa.int64())), []
                start += len(t)
        return
    if ref.format == "csv":
        yield from _iter_csv(ref, columns, batch_rows)
        return
    yield from _iter_jsonl(ref, columns, batch_rows)


def _iter_csv(ref: FileRef, columns: list[str], batch_rows: int):
    malformed: list[tuple[int, str, str]] = []

    def on_invalid(row) -> str:
        # pyarrow numbers rows from 1 including the header line; ours are 0-based data rows.
        line = (row.number or 0) - 2
        malformed.append((line, f"expected {row.expected_columns} columns, got {row.actual_columns}", row.text))
        return "skip"

    with _open(ref.uri) as f:
        reader = pacsv.open_csv(
            _ReplacingUTF8(f),
            parse_options=pacsv.ParseOptions(
                delimiter=_csv_delimiter(ref.uri), invalid_row_handler=on_invalid
            ),
            # Every column as text: type problems (and bytes that are not UTF-8, _utf8_rows)
            # become per-row rejects, not a crashed read.
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=True,
            ),
            # single-threaded so that invalid rows carry their line number
            read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
        )
        seen = 0  # valid rows emitted so far; malformed rows are interleaved by line number
        pending: list[pa.RecordBatch] = []
        for batch in reader:
            pending.append(batch)
            if sum(len(b) for b in pending) >= batch_rows:
                t = pa.Table.from_batches(pending)
                pending = []
                rows, seen = _csv_rows(len(t), seen, malformed)
                yield _utf8_rows(t, rows, malformed)
                malformed.clear()
        t = pa.Table.from_batches(pending, schema=reader.schema)
        rows, seen = _csv_rows(len(t), seen, malformed)
        yield _utf8_rows(t, rows, malformed)


REPLACEMENT = "\ufffd"  # what a byte that is not UTF-8 reads as


class _ReplacingUTF8:
    """A binary stream whose bytes that are not UTF-8 read as U+FFFD (pyarrow's csv reader
    cannot even report such a line as malformed; its handler fails to decode it)."""

    def __init__(self, raw):
        self.raw, self.decoder = raw, codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n if n and n > 0 else 1 << 22)
        return self.decoder.decode(chunk, final=not chunk).encode("utf-8")

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _utf8_rows(t: pa.Table, rows: list[int], malformed: list) -> tuple[pa.Table, list]:
    """``__row`` numbers appended; rows with a U+FFFD (bytes that were not UTF-8) move to the
    malformed rows, naming the column."""
    bad = np.zeros(t.num_rows, bool)
    where = np.full(t.num_rows, None, dtype=object)
    for c in t.column_names:
        hit = np.asarray(pc.fill_null(pc.match_substring(t[c], REPLACEMENT), False)) & ~bad
        where[hit] = c
        bad |= hit
    if bad.any():
        for i in np.flatnonzero(bad):
            raw = ",".join("" if v is None else v for v in t.slice(int(i), 1).to_pylist()[0].values())
            malformed.append((rows[i], f"{where[i]}: not UTF-8 (an invalid byte, read as U+FFFD)", raw[:500]))
        keep = np.flatnonzero(~bad)
        t, rows = t.take(pa.array(keep, pa.int64())), [rows[i] for i in keep]
    return t.append_column("__row", pa.array(rows, pa.int64())), sorted(malformed)


def _csv_rows(n: int, seen: int, malformed: list[tuple[int, str, str]]) -> tuple[list[int], int]:
    """Data-row numbers of ``n`` valid rows, skipping the line numbers of malformed rows."""
    bad = sorted(m[0] for m in malformed)
    rows, row, j = [], seen, 0
    # every row before the first valid one that was malformed shifts the numbering
    while len(rows) < n:
        while j < len(bad) and bad[j] < row:
            j += 1
        if j < len(bad) and bad[j] == row:
            row += 1
            j += 1
            continue
        rows.append(row)
        row += 1
    return rows, row


def _iter_jsonl(ref: FileRef, columns: list[str], batch_rows: int):
    with _open(ref.uri) as f:
        cols: dict[str, list] = {c: [] for c in columns}
        rows: list[int] = []
        malformed: list[tuple[int, str, str]] = []
        for row, line in enumerate(_iter_lines(f)):
            problem = not_utf8(line)
            if problem:
                malformed.append((row, problem, line[:500].decode("utf-8", errors="replace")))
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                malformed.append((row, f"invalid JSON: {exc}", line[:500].decode()))
                continue
            for c in columns:
                v = record.get(c)
                cols[c].append(None if v is None else (v if isinstance(v, str) else json.dumps(v)))
            rows.append(row)
            if len(rows) >= batch_rows:
                yield _jsonl_table(cols, rows), malformed
                cols, rows, malformed = {c: [] for c in columns}, [], []
        yield _jsonl_table(cols, rows), malformed


def _jsonl_table(cols: dict[str, list], rows: list[int]) -> pa.Table:
    # JSON values are kept as text (numbers as their JSON spelling) and typed by the validator.
    data = {c: pa.array(v, pa.string()) for c, v in cols.items()}
    data["__row"] = pa.array(rows, pa.int64())
    return pa.table(data)


def read_table(uri: str, fmt: str = "auto") -> pa.Table:
    """Read a whole (small) table such as an item catalogue or a user file; all columns as text."""
    refs = list_files(uri, fmt)
    tables = []
    for ref in refs:
        cols = read_columns(ref)
        parts = []
        for t, malformed in iter_record_batches(ref, cols):
            if malformed:
                row, detail, _ = malformed[0]
                raise DataError(f"{ref.uri}: row {row}: {detail}")
            parts.append(t.drop_columns(["__row"]))
        t = pa.concat_tables(parts) if parts else pa.table({c: pa.array([], pa.string()) for c in cols})
        tables.append(t.cast(pa.schema([(n, pa.string()) for n in t.column_names])) if t.num_columns else t)
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as exc:
        raise DataError(f"{uri}: files disagree on columns ({exc})") from None
