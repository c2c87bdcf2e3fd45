"""Where benchmark results go: a local folder, or s3:// through a scratch folder."""

from __future__ import annotations

import json

import boto3
import pytest

from recsys_ray.bench.common import publish, work_dir
from recsys_ray.errors import RecsysError


def test_results_land_in_a_local_folder_or_an_s3_prefix(tmp_path, s3_server):
    local = work_dir(str(tmp_path / "out"))
    assert local == tmp_path / "out" and local.is_dir()
    assert publish(str(tmp_path / "out"), local) == str(local)

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="bench")
    scratch = work_dir("s3://bench/train/")
    (scratch / "results.json").write_text(json.dumps({"ratio": 1.5}))
    (scratch / "results.md").write_text("| a |\n")
    (scratch / "runs").mkdir()  # scratch beside the results is not uploaded
    assert publish("s3://bench/train/", scratch) == "s3://bench/train"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="bench")["Contents"] if not o["Key"].endswith("/"))
    assert keys == ["train/results.json", "train/results.md"]
    assert json.loads(s3.get_object(Bucket="bench", Key="train/results.json")["Body"].read()) == {"ratio": 1.5}
    assert not scratch.exists()

    with pytest.raises(RecsysError, match=r"^output: cannot write s3://no-such-bucket/x: no such bucket"):
        work_dir("s3://no-such-bucket/x")  # before anything is measured
