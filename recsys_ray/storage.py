"""Local paths and ``s3://`` URIs alike: one filesystem helper for everything that reads or writes.

pyarrow's filesystem layer does the work. S3 credentials come from the standard AWS chain
(environment, shared config, instance profile); an S3-compatible store (MinIO, moto) is reached
through ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, the variables the AWS CLI honours.
Remote folders that a library must read from disk (a Hugging Face model, a checkpoint) are
copied once into a local cache (``$RECSYS_RAY_CACHE``, default ``~/.cache/recsys_ray``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from recsys_ray.errors import RecsysError, one_line

log = logging.getLogger(__name__)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names a remote store (``s3://``, ``gs://``...) rather than a local path."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path, ``file://`` or a remote URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (``s3://bucket/x``)."""
    return "/".join([str(base).rstrip("/"), *parts])


def absolute(path: str) -> str:
    """A local path made absolute (other processes have other working directories); URIs pass."""
    return str(path) if is_remote(path) else str(Path(path).expanduser().resolve())


def read_text(uri: str) -> str | None:
    """A small file's text, or None when it does not exist."""
    fs, p = filesystem(uri)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a small text file, creating its folder."""
    fs, p = filesystem(uri)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode("utf-8"))


def cache_root() -> Path:
    """Where remote folders are copied to (``$RECSYS_RAY_CACHE`` or ``~/.cache/recsys_ray``)."""
    return Path(os.environ.get("RECSYS_RAY_CACHE") or "~/.cache/recsys_ray").expanduser()


def local_copy(uri: str, marker: str, what: str = "folder") -> str:
    """A local copy of the remote folder ``uri`` (made once, then reused), which must hold ``marker``.

    Copied into a private folder, then renamed: several processes on one node may fetch the same
    folder at once, and a half-copied folder is never visible.
    """
    dest = cache_root() / "models" / hashlib.sha256(str(uri).rstrip("/").encode()).hexdigest()[:16]
    if (dest / marker).is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        fs, root = filesystem(uri)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise RecsysError(f"{what} {uri!r}: no such folder")
        log.info("copying %s %s to %s", what, uri, dest)
        pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        if not (tmp / marker).is_file():
            raise RecsysError(f"{what} {uri!r}: no {marker} under that prefix")
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (dest / marker).is_file():
                raise
    except (OSError, ValueError) as exc:  # pyarrow's IO errors are OSError, bad URIs ValueError
        raise RecsysError(f"{what} {uri!r}: cannot copy ({one_line(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
