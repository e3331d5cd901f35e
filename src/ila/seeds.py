"""Seeds derived from the run seed and what a stage works on, so that runs which should be independent are.

Two identify runs with one `run.seed` on two data sets, or Stage 2 on two milestones of one Stage 1, would
otherwise share the LoRA initialisation or the Stage-2 batch order, and their rankings would agree more than
the data make them. A config can still pin a stage's seed to share it on purpose.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from the parts' text; the same parts give the same seed on every machine."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
