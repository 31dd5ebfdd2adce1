"""Locations tests read: the shared folder beside the checkout (read-only), the installed open_clip."""

import hashlib
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
LAYOUTS_JSON = SHARED / "reference" / "openclip_lcl_layouts.json"
MMC4_DIR = SHARED / "data" / "mmc4"


def open_clip_file(name: str) -> Path:
    """A module file of the installed open_clip_torch, found without importing the package
    (its __init__ imports torchvision, whose PyPI wheel needs CUDA torch)."""
    spec = importlib.util.find_spec("open_clip")
    return Path(spec.submodule_search_locations[0]) / name


def corpus_file_hashes(directory: Path) -> dict:
    """File name -> SHA-256 of every file of a built corpus directory."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}
