"""Local paths and ``s3://`` URIs alike: one filesystem helper for everything that reads or writes.

pyarrow's filesystem layer does the work. S3 credentials come only from the standard AWS chain
(environment, shared config, instance profile / IRSA), resolved by each process itself: nothing
here passes a key anywhere (a pickled ``S3FileSystem`` carries endpoint and region, no secret).
An S3-compatible store (MinIO, moto) is reached through ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, the variables the AWS CLI honours, or a job's ``s3_endpoint`` config field
(:func:`use_endpoint`, which also hands it to the job's Ray workers: an endpoint is not a secret).
Connections time out in seconds, so a wrong endpoint fails fast with :func:`describe`'s one line.
Remote folders that a library must read from disk (a Hugging Face model, a checkpoint) are
copied once into a local cache (``$RECSYS_RAY_CACHE``, default ``~/.cache/recsys_ray``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys_ray.errors import RecsysError, one_line

log = logging.getLogger(__name__)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names a remote store (``s3://``, ``gs://``...) rather than a local path."""
    return "://" in str(uri) and not str(uri).startswith("file://")


# seconds: an endpoint that does not answer fails a call in ~2 x connect timeout, not minutes
S3_CONNECT_TIMEOUT_S = 3.0
S3_REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 2
# non-secret storage settings a job's Ray workers get from its runtime_env (see use_endpoint)
WORKER_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


def endpoint() -> str | None:
    """The S3 endpoint override in effect in this process (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def use_endpoint(url: str | None) -> None:
    """A job's ``s3_endpoint`` config field: this process and the job's Ray workers use it
    (:func:`worker_env` is what :func:`recsys_ray.runtime.init_ray` hands them)."""
    if url:
        os.environ["AWS_ENDPOINT_URL_S3"] = url


def worker_env() -> dict[str, str]:
    """The non-secret storage settings of this process (endpoint, region), for Ray workers."""
    return {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path, ``file://`` or a remote URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        kwargs: dict = {"connect_timeout": S3_CONNECT_TIMEOUT_S, "request_timeout": S3_REQUEST_TIMEOUT_S,
                        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)}
        if endpoint():
            scheme, _, host = endpoint().partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def uri_of(like: str, fs_path: str) -> str:
    """The URI of a path inside the filesystem of ``like`` (Ray reports ``bucket/key`` paths)."""
    if str(like).startswith("s3://") and not str(fs_path).startswith("s3://"):
        return "s3://" + str(fs_path).lstrip("/")
    return str(fs_path)


def ray_target(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) to hand Ray (Data readers/writers, Train / Tune ``storage_path``): a
    remote URI gets this module's filesystem (endpoint, timeouts; pickled without credentials) and
    the path inside it; a local path stays a plain absolute path, resolved by Ray as always."""
    if not is_remote(uri):
        return absolute(uri), None
    fs, path = filesystem(uri)
    return path, fs


def describe(exc: BaseException, uri: str) -> str:
    """One line for a storage error: which bucket/key (or path) and the cause, without the SDK's
    request ids and curl codes."""
    text = one_line(exc)
    where = f"{uri}:"
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode: 28" in text:
        return f"{where} cannot reach the S3 endpoint {endpoint() or 'of AWS'} ({text.split('Details:')[-1].strip()})"
    if any(m in text for m in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                               "403", "No response body", "credentials")):
        return f"{where} access denied: check the AWS credentials this process sees ({text.split(':', 1)[-1].strip()[:200]})"
    if ("NoSuchBucket" in text or "NO_SUCH_BUCKET" in text or "bucket does not exist" in text.lower()
            or (text.startswith("Bucket '") and "not found" in text)):
        return f"{where} no such bucket (create it first)"
    return f"{where} {text}"


def job_scratch_dir() -> Path | None:
    """The working directory Ray unpacked this job into (``ray job submit --working-dir``), or
    None: a folder Ray owns and deletes when it evicts the package, so nothing may be kept there."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 1):
        if parts[i] == "runtime_resources" and parts[i + 1] == "working_dir_files":
            return Path(*parts[: i + 3]) if len(parts) > i + 2 else cwd
    return None


def check_writable(uri: str, what: str) -> None:
    """Fail now, with the reason, if ``uri`` cannot be written (a probe file written and removed)
    or would not outlive the job (a local path inside the job's Ray-managed working dir)."""
    scratch = None if is_remote(uri) else job_scratch_dir()
    if scratch is not None and Path(uri).expanduser().resolve().is_relative_to(scratch):
        raise RecsysError(
            f"{what}: {uri} is inside this Ray job's working dir ({scratch}), which Ray deletes after "
            "the job: give an s3:// URI or an absolute path every node can reach")
    fs, path = filesystem(uri)
    probe = f"{path.rstrip('/')}/.recsys_ray_write_probe"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as exc:
        raise RecsysError(f"{what}: cannot write {describe(exc, uri)}") from None


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (``s3://bucket/x``)."""
    return "/".join([str(base).rstrip("/"), *parts])


def absolute(path: str) -> str:
    """A local path made absolute (other processes have other working directories); URIs pass."""
    return str(path) if is_remote(path) else str(Path(path).expanduser().resolve())


@contextlib.contextmanager
def named_errors(uri: str):
    """Storage errors inside the block become one RecsysError line naming ``uri`` (:func:`describe`)."""
    try:
        yield
    except OSError as exc:
        raise RecsysError(describe(exc, uri)) from None


def info(uri: str) -> pafs.FileInfo:
    """What is at ``uri`` (``type`` NotFound / File / Directory); storage errors in one line."""
    fs, p = filesystem(uri)
    with named_errors(uri):
        return fs.get_file_info(p)


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def read_text(uri: str) -> str | None:
    """A small file's text, or None when it does not exist."""
    if info(uri).type != pafs.FileType.File:
        return None
    fs, p = filesystem(uri)
    with named_errors(uri), fs.open_input_stream(p) as f:
        return f.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a small text file, creating its folder."""
    fs, p = filesystem(uri)
    with named_errors(uri):
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(text.encode("utf-8"))


def write_parquet(table, uri: str) -> None:
    """One parquet file at ``uri`` (local or remote), its folder created."""
    fs, p = filesystem(uri)
    with named_errors(uri):
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, p, filesystem=fs)


def is_empty_dir(uri: str) -> bool:
    """Whether ``uri`` is missing or a folder without entries."""
    fs, p = filesystem(uri)
    with named_errors(uri):
        if fs.get_file_info(p).type == pafs.FileType.NotFound:
            return True
        return not fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))


def upload_dir(local: str | Path, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (local or remote), replacing same-named files."""
    fs, p = filesystem(uri)
    with named_errors(uri):
        fs.create_dir(p, recursive=True)
        pafs.copy_files(str(local), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def delete_dir(uri: str) -> None:
    """Remove a folder (local or a prefix in a bucket) if it exists."""
    fs, p = filesystem(uri)
    with named_errors(uri):
        kind = fs.get_file_info(p).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(p)
        elif kind == pafs.FileType.File:
            fs.delete_file(p)


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
