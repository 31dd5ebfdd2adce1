"""A save's parts that need no process group: per-rank hashing, the manifest from the ranks' reports,
the host copy a background save writes, and when a save writes the consolidated model file."""

import hashlib

import pytest
import torch

from lcl_megatron.checkpoint.format import (COMPLETE, CheckpointError, SafeCheckpointEngine, assemble_manifest,
                                            read_manifest, safe_torch_load, verify_checkpoint, write_manifest)
from lcl_megatron.checkpoint.manager import consolidates, summarize_save


def test_each_file_is_hashed_by_the_rank_that_writes_it(tmp_path):
    engine = SafeCheckpointEngine()
    path = tmp_path / "mp_rank_00_model_states.pt"
    engine.save({"w": torch.arange(6.0)}, str(path))
    entry = engine.written[str(path)]
    assert entry == {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_a_deferred_save_writes_the_state_as_it_was_when_saved(tmp_path):
    engine = SafeCheckpointEngine()
    engine.deferred = []
    live = {"w": torch.zeros(4), "nested": [torch.ones(2)]}
    path = tmp_path / "state.pt"
    engine.save(live, str(path))
    assert not path.exists() and engine.written == {}
    live["w"].add_(5)  # training goes on while the file is written
    live["nested"][0].add_(5)
    (target, write, size), = engine.deferred
    assert target == str(path) and size == 6 * 4
    write(path)
    saved = safe_torch_load(path)
    assert torch.equal(saved["w"], torch.zeros(4)) and torch.equal(saved["nested"][0], torch.ones(2))


def test_the_manifest_is_assembled_from_every_ranks_report(tmp_path):
    reports = [{"a.pt": {"bytes": 1, "sha256": "aa"}, "config.yaml": {"bytes": 3, "sha256": "cc"}},
               {"b.pt": {"bytes": 2, "sha256": "bb"}}, {}]
    manifest = assemble_manifest(reports, {"step": 7})
    assert manifest == {"step": 7, "files": {"a.pt": {"bytes": 1, "sha256": "aa"}, "b.pt": {"bytes": 2, "sha256": "bb"},
                                             "config.yaml": {"bytes": 3, "sha256": "cc"}}}
    assert list(manifest["files"]) == sorted(manifest["files"])
    with pytest.raises(CheckpointError, match="two ranks wrote 'a.pt'"):
        assemble_manifest([reports[0], {"a.pt": {"bytes": 1, "sha256": "zz"}}], {})


def test_a_file_no_rank_reported_is_hashed_into_the_manifest(tmp_path):
    """DeepSpeed copies its recovery scripts itself: they are listed and checked like the rest."""
    engine = SafeCheckpointEngine()
    engine.save({"w": torch.ones(3)}, str(tmp_path / "a.pt"))
    (tmp_path / "zero_to_fp32.py").write_text("# a script\n")
    (tmp_path / ".a.pt.x.tmp").write_text("a torn temporary file")
    write_manifest(tmp_path, {"step": 1}, {"a.pt": engine.written[str(tmp_path / "a.pt")]})
    assert sorted(read_manifest(tmp_path)["files"]) == ["a.pt", "zero_to_fp32.py"]
    verify_checkpoint(tmp_path)  # every listed entry matches its file
    (tmp_path / "zero_to_fp32.py").write_text("# changed\n")
    with pytest.raises(CheckpointError, match="zero_to_fp32.py"):
        verify_checkpoint(tmp_path)
    assert (tmp_path / COMPLETE).is_file()


@pytest.mark.parametrize("schedule, expected", [
    ("end", [False, False, False, True]),
    ("every", [True, True, True, True]),
    ("2", [False, True, False, True]),
    ("3", [False, False, True, True]),
])
def test_the_consolidated_model_file_is_written_on_schedule(schedule, expected):
    assert [consolidates(schedule, i, final=i == 4) for i in range(1, 5)] == expected


def test_a_saves_row_takes_the_slowest_rank_and_every_ranks_memory():
    reports = [{"seconds": 2.0, "blocking_s": 0.5, "files": {"a": {"bytes": 10}}, "peak_host_bytes": 100,
                "snapshot_bytes": 40},
               {"seconds": 3.0, "blocking_s": 0.25, "files": {"b": {"bytes": 5}, "c": {"bytes": 1}},
                "peak_host_bytes": 90, "snapshot_bytes": 30}]
    row = summarize_save(12, reports, background=True)
    assert row["checkpoint_save_s"] == 3.0 and row["checkpoint_rank0_s"] == 2.0
    assert row["checkpoint_rank_s"] == [2.0, 3.0]
    assert row["checkpoint_blocking_s"] == 0.5
    assert row["checkpoint_bytes"] == 16 and row["checkpoint_files"] == 3
    assert row["checkpoint_peak_host_bytes"] == [100, 90] and row["checkpoint_snapshot_bytes"] == [40, 30]
