"""Joining a cluster: the job's own runtime_env keys are not set twice (Ray refuses that)."""

from __future__ import annotations

import json

from recsys_ray.runtime import _job_env_keys


def test_the_submitted_jobs_env_var_names_are_read_from_its_job_config(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _job_env_keys() == set()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"AWS_ENDPOINT_URL": "http://h:1"}}}))
    assert _job_env_keys() == {"AWS_ENDPOINT_URL"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert _job_env_keys() == set()
