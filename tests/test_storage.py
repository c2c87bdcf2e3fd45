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
