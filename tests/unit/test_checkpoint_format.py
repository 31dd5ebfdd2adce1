"""The one checkpoint finder: which directory a run directory, a checkpoints/ directory or `latest` leads to."""

import pytest

from lcl_megatron.checkpoint.format import (CHECKPOINTS_DIR, COMPLETE, LATEST, MODEL_FILE, CheckpointError,
                                            resolve_checkpoint, tag_for, write_manifest)


def make_run(tmp_path, complete=(), incomplete=()):
    """A run directory with the given steps saved; an incomplete one has its files but no manifest."""
    root = tmp_path / "run" / CHECKPOINTS_DIR
    for step in (*complete, *incomplete):
        ckpt = root / tag_for(step)
        ckpt.mkdir(parents=True)
        (ckpt / MODEL_FILE).write_bytes(b"weights")
        if step in complete:
            write_manifest(ckpt, {"step": step})
    return tmp_path / "run", root


def test_a_run_directory_leads_to_its_newest_complete_checkpoint_past_an_unfinished_save(tmp_path):
    run, root = make_run(tmp_path, complete=(2, 4), incomplete=(6,))
    assert resolve_checkpoint(run) == root / tag_for(4)
    assert resolve_checkpoint(root) == root / tag_for(4)
    assert resolve_checkpoint(root / tag_for(2)) == root / tag_for(2)


def test_latest_leads_to_the_checkpoint_it_names_or_else_the_newest_complete_one(tmp_path):
    run, root = make_run(tmp_path, complete=(2, 4), incomplete=(6,))
    (root / LATEST).write_text(tag_for(2))
    assert resolve_checkpoint(root / LATEST) == root / tag_for(2)
    (root / LATEST).write_text(tag_for(6))  # its save never finished
    assert resolve_checkpoint(root / LATEST) == root / tag_for(4)
    (root / LATEST).write_text("../../elsewhere")  # not a checkpoint of this run
    assert resolve_checkpoint(root / LATEST) == root / tag_for(4)


def test_an_unfinished_or_missing_checkpoint_is_refused(tmp_path):
    run, root = make_run(tmp_path, complete=(2,), incomplete=(6,))
    with pytest.raises(CheckpointError, match=f"has no {COMPLETE} manifest: its save never finished"):
        resolve_checkpoint(root / tag_for(6))
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint found"):
        resolve_checkpoint(tmp_path / "empty")
