"""The prepared-data folder's one reader: parts, the manifest, and what a broken folder gets."""

from __future__ import annotations

import pytest

from recsys_ray.data import layout
from recsys_ray.errors import DataError


def test_a_prepared_folder_reads_part_by_part(syn_data):
    assert layout.is_prepared(syn_data)
    m = layout.read_manifest(syn_data)
    assert layout.read_items(syn_data).num_rows == m["counts"]["items"]
    assert layout.read_sequences(syn_data, ["user_id"]).num_rows == m["counts"]["users"]
    for split in layout.SPLITS:
        assert layout.read_split(syn_data, split).num_rows == m["counts"]["examples_by_split"][split]
    assert "profile_ids" in layout.columns(syn_data, layout.split_part("valid"))
    rows = layout.read_split_rows(syn_data, "test")
    assert len(rows) == m["counts"]["events_by_split"]["test"] and {"user_id", "seen_item_ids"} <= set(rows[0])


def test_a_broken_folder_is_named_in_one_line(tmp_path):
    assert not layout.is_prepared(str(tmp_path))
    with pytest.raises(DataError, match="no manifest.json"):
        layout.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: unreadable"):
        layout.read_manifest(str(tmp_path))
    with pytest.raises(DataError, match="no prepared valid split"):
        layout.read_split(str(tmp_path), "valid")
    with pytest.raises(DataError, match="missing sequences/"):
        layout.require_parts(str(tmp_path), [layout.SEQUENCES])
    with pytest.raises(ValueError, match="split must be one of"):
        layout.split_part("dev")
