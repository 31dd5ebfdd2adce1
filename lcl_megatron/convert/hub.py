"""Upload an export folder to the Hugging Face Hub, or say in one line how to do it later."""

from __future__ import annotations

import os
from pathlib import Path

# The convert commands' own marker files stay local (see convert/output.py).
IGNORE = [".*"]


def later(folder: Path, repo: str, why: str) -> str:
    return f"not pushed ({why}); to publish later run: huggingface-cli upload {repo} {folder} . --exclude '.*'"


def push_folder(folder: Path, repo: str) -> str:
    """Upload `folder` to the model repo `repo` (created if absent); a line saying what happened."""
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        return later(folder, repo, "huggingface_hub is not installed")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: look at the environment too.
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE:
        return later(folder, repo, "HF_HUB_OFFLINE is set")
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", ignore_patterns=IGNORE)
    except Exception as e:  # no network, no token, no rights: the export stands, the push waits
        if isinstance(e, OSError):  # requests' connection errors are OSErrors
            return later(folder, repo, "cannot reach the Hugging Face Hub")
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return later(folder, repo, f"{type(e).__name__}: {first}")
    return f"pushed {folder} to {getattr(commit, 'repo_url', repo)}"
