"""Seeds derived from names, so that every random choice of the data pipeline can be replayed."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 64-bit seed from any printable parts, identical in every process and run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")
