"""Local paths and URIs through one helper: joins, absolute paths, S3 endpoints, small files."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from recsys_ray import storage
from recsys_ray.errors import RecsysError


def test_paths_and_uris():
    assert storage.is_remote("s3://b/x") and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp")
    assert storage.join("s3://b/runs/", "cpu", "checkpoint_1") == "s3://b/runs/cpu/checkpoint_1"
    assert storage.absolute("s3://b/x") == "s3://b/x"
    assert storage.absolute("rel/dir").startswith("/") and storage.absolute("rel/dir").endswith("rel/dir")
    fs, path = storage.filesystem("file:///tmp/a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/a"


def test_s3_endpoint_and_region_come_from_the_aws_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    fs, path = storage.filesystem("s3://bucket/prefix/file.parquet")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/prefix/file.parquet"
    assert fs.region == "eu-west-3"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")  # the S3-specific one wins
    fs, _ = storage.filesystem("s3://bucket/x")
    assert "127.0.0.1:10" in repr(fs.__reduce__())


def test_small_files_round_trip_and_a_missing_one_is_none(tmp_path):
    target = str(tmp_path / "deep" / "dir" / "f.txt")
    storage.write_text(target, "hello")
    assert storage.read_text(target) == "hello"
    assert storage.read_text(str(tmp_path / "nope.txt")) is None


def test_local_copy_refuses_a_folder_without_its_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_RAY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RecsysError, match="no such folder"):
        storage.local_copy(f"file://{tmp_path}/missing", "config.json")


def test_storage_errors_become_one_line_naming_the_uri(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    refused = OSError("When getting information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                      "HeadObject operation: curlCode: 7, Could not connect to server; Details: Failed to connect")
    assert storage.describe(refused, "s3://b/k") == \
        "s3://b/k: cannot reach the S3 endpoint http://127.0.0.1:1 (Failed to connect)"
    denied = OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body.")
    assert storage.describe(denied, "s3://b/k").startswith("s3://b/k: access denied: check the AWS credentials")
    for wrong in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):  # what real S3 says to a wrong key / secret
        err = OSError(f"AWS Error UNKNOWN (HTTP status 403) during ListObjectsV2 operation: {wrong}: the key ...")
        assert storage.describe(err, "s3://b/k").startswith("s3://b/k: access denied: check the AWS credentials")
    missing = OSError("Bucket 'nope' not found. To create buckets, enable the allow_bucket_creation option.")
    assert storage.describe(missing, "s3://nope/x") == "s3://nope/x: no such bucket (create it first)"
    with pytest.raises(RecsysError, match=r"^s3://b/k: cannot reach the S3 endpoint http://127.0.0.1:1"):
        storage.info("s3://b/k")  # a refused endpoint fails at once, not after retries for minutes


def test_a_path_that_cannot_be_written_fails_before_any_work(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "dir"), "output")
    assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecsysError, match=r"^output: cannot write .*file/sub"):
        storage.check_writable(str(tmp_path / "file" / "sub"), "output")


def test_an_output_inside_a_ray_jobs_working_dir_is_refused(tmp_path, monkeypatch):
    # what `ray job submit --working-dir .` runs in: a package Ray unpacked and deletes later
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    assert storage.job_scratch_dir() == job_dir
    with pytest.raises(RecsysError, match=r"^storage_path: artifacts/runs is inside this Ray job's working dir .*s3://"):
        storage.check_writable("artifacts/runs", "storage_path")
    assert not (job_dir / "artifacts").exists()
    storage.check_writable(str(tmp_path / "kept"), "storage_path")  # outside it: fine
    monkeypatch.chdir(tmp_path)
    assert storage.job_scratch_dir() is None
    storage.check_writable("artifacts/runs", "storage_path")


def test_only_non_secret_settings_reach_the_workers(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-passed")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "never-passed-either")
    # setenv first: monkeypatch then restores the variable's original state (absent) at the end,
    # also after use_endpoint wrote it behind monkeypatch's back (a leak here broke later S3 tests)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "unset-below")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    storage.use_endpoint("http://127.0.0.1:9000")
    env = storage.worker_env()
    assert env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"
    assert not any("never-passed" in v for v in env.values()) and set(env) <= set(storage.WORKER_ENV)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    path, fs = storage.ray_target("s3://bucket/runs")
    assert path == "bucket/runs" and isinstance(fs, pafs.S3FileSystem)
    assert storage.ray_target("rel/x")[1] is None and storage.ray_target("rel/x")[0].startswith("/")
    assert storage.uri_of("s3://bucket/runs", "bucket/runs/x/checkpoint_1") == "s3://bucket/runs/x/checkpoint_1"
    assert storage.uri_of("/local/runs", "/local/runs/x") == "/local/runs/x"
