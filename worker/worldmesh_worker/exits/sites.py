"""The block counts of the built-in models, without importing torch or the models.

The operator checks ``spec.earlyExits.ramps`` against them (a ramp sits after block
``0..num_blocks-2``); a test keeps them equal to the models' ``num_blocks``.
"""

from __future__ import annotations

BUILTIN_BLOCKS = {
    "efficientnet-lite0": 18,
    "minilm-l6": 8,
    "mpnet-base": 14,
    "toy": 4,
    "toy-slow": 4,
}


def site_error(model: str, site: int) -> str | None:
    """Why ``site`` is not a ramp site of built-in ``model`` (None if it is, or if unknown)."""
    blocks = BUILTIN_BLOCKS.get(model)
    if blocks is None or 0 <= site <= blocks - 2:
        return None
    return (
        f"{site} is not a ramp site of model {model!r} "
        f"(sites are blocks 0..{blocks - 2}, before its final head)"
    )
