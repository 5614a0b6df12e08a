"""Threshold tuning: a greedy hill climb over per-ramp thresholds on a window of labelled rows.

A labelled row records, per ramp that answered it, the ramp's error ``1 - max softmax``
and whether its label agreed with the final (full-model) answer. Under thresholds
``t``, the row exits at the first ramp (in block order) whose error is below its
threshold; the window's *loss* is the fraction of rows that exit with a disagreeing
label, and its *saving* the mean latency saved (``saved[r]`` per exit at ramp ``r``).

With ``prior`` > 0, every ramp that lets at least one row exit adds ``prior`` unseen
disagreements to the loss (a ramp's threshold sits just below the first disagreement the
window shows; the next rows will show more), which also keeps the ramps in use few.

``tune`` keeps the loss within the budget while maximising the saving:

1. while the loss is over budget, lower the threshold whose one-level drop brings the
   loss down most (ties: the one that keeps the most saving), down to 0 (never exit);
2. then, repeatedly, raise one threshold to the next level that lets at least one more
   row exit, choosing the move with the largest saving whose loss stays within budget,
   until no such move exists.

A ramp that answered only some of the window's rows (one switched on lately answers the
newest rows only) has its disagreements counted at its rate over the rows it answered, as
if it had answered every row. Counted once per row, the rows it never saw pass for rows it
let go, so it could spend the whole window's budget on the few it saw: live on MPNet-base,
a ramp switched on 227 labelled rows before climbed to 0.178, where it alone disagrees on
1.45% of the test split, and gave 4 of the run's 10 wrong answers after learning.

Thresholds live on a fixed grid (``LEVELS``: 0, then 33 log-spaced levels from 1e-4 to
1), so the climb is finite and its result does not depend on float noise. All of it is
numpy over the whole window: replaying 9,000 held-out EfficientNet-Lite0 rows through the
controller (1,024-row window, 17 ramps), a tune took 0.3 ms at the median and up to 140 ms
in the first climbs from closed thresholds, where every ramp climbs level by level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVELS = np.concatenate([[0.0], np.logspace(-4.0, 0.0, 33)])


def level_of(threshold: float) -> int:
    """The grid index of the highest level at or below ``threshold``."""
    return int(np.searchsorted(LEVELS, threshold + 1e-12, side="right") - 1)


def evaluate(
    errs: np.ndarray,
    agree: np.ndarray,
    thresholds: np.ndarray,
    saved: np.ndarray,
    prior: float = 0.0,
    answered: np.ndarray | None = None,
) -> tuple[float, float, np.ndarray]:
    """``(loss, mean saving, exits per ramp)`` of ``thresholds`` on a window.

    ``errs`` ``[W, R]`` (NaN where a ramp did not answer), ``agree`` ``[W, R]`` bool,
    ``thresholds`` and ``saved`` ``[R]``, ramps in block order. With ``answered`` (the rows
    each ramp answered, ``[R]``), a disagreement at ramp r counts ``W / answered[r]``.
    """
    rows = len(errs)
    if rows == 0:
        return 0.0, 0.0, np.zeros(errs.shape[1], dtype=np.int64)
    exits = np.nan_to_num(errs, nan=np.inf) < thresholds
    any_exit = exits.any(axis=1)
    first = exits.argmax(axis=1)
    idx = np.arange(rows)
    wrong = any_exit & ~agree[idx, first]
    counts = np.bincount(first[any_exit], minlength=errs.shape[1])
    saving = float(saved[first[any_exit]].sum()) / rows
    unseen = prior * float((counts > 0).sum())
    if answered is None:
        lost = float(wrong.sum())
    else:
        lost = float((rows / np.maximum(answered, 1))[first[wrong]].sum())
    return (lost + unseen) / rows, saving, counts


def tune(
    errs: np.ndarray,
    agree: np.ndarray,
    levels: Sequence[int],
    saved: np.ndarray,
    budget: float,
    tunable: Sequence[bool] | None = None,
    climb: Sequence[bool] | None = None,
    prior: float = 0.0,
) -> list[int]:
    """New grid levels for the ramps (see module docstring); ``tunable[r]`` False pins ramp r,
    and ``climb[r]`` False only lets it go down (too few rows to trust a rise)."""
    lv = np.array(levels, dtype=np.int64)
    can = np.ones(len(lv), dtype=bool) if tunable is None else np.array(tunable, dtype=bool)
    answered = np.isfinite(errs).sum(axis=0)  # a partial ramp's loss at its own rate
    loss, saving, _ = evaluate(errs, agree, LEVELS[lv], saved, prior, answered)
    while loss > budget:
        best: tuple[float, float, int] | None = None
        for r in np.flatnonzero(can & (lv > 0)):
            trial = lv.copy()
            trial[r] -= 1
            t_loss, t_saving, _ = evaluate(errs, agree, LEVELS[trial], saved, prior, answered)
            key = (t_loss, -t_saving, int(r))
            if best is None or key < best:
                best = key
        if best is None:
            break
        lv[best[2]] -= 1
        loss, saving = best[0], -best[1]
    up = can if climb is None else can & np.array(climb, dtype=bool)
    while True:
        move: tuple[float, int, int] | None = None
        for r in np.flatnonzero(up):
            nxt = _next_level(errs[:, r], int(lv[r]))
            if nxt is None:
                continue
            trial = lv.copy()
            trial[r] = nxt
            t_loss, t_saving, _ = evaluate(errs, agree, LEVELS[trial], saved, prior, answered)
            if t_loss <= budget and t_saving >= saving and (move is None or t_saving > move[0]):
                move = (t_saving, int(r), nxt)
        if move is None:
            break
        saving = move[0]
        lv[move[1]] = move[2]
    return [int(x) for x in lv]


def _next_level(errs: np.ndarray, level: int) -> int | None:
    """The lowest level above ``level`` at which one more of ``errs`` falls below it."""
    pending = errs[np.isfinite(errs) & (errs >= LEVELS[level])]
    if len(pending) == 0:
        return None
    nxt = int(np.searchsorted(LEVELS, pending.min(), side="right"))
    return nxt if nxt < len(LEVELS) else None
