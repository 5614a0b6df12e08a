"""Ramp management: which ramps run, by their measured utility, under a ramp-overhead budget.

Apparate's rule: a ramp's utility is ``exit rate x latency saved - pass-through rate x
ramp cost``, where the exit rate is what the tuned thresholds give on the recent
window, the latency saved is measured (final answer time minus the ramp's answer time,
as a share of the row's latency, priced at the full model's mean latency now: see
``ExitController.saved_s``) and the cost is the measured compute time the ramp adds to
each batch that runs it.

``exit rate x latency saved`` overstates what a ramp brings when ramps share one accuracy
budget: the rows an early ramp releases, a later one would often release too, and every
ramp spends part of the budget. So where the controller measured it, the saving term is
the ramp's *marginal* saving: the window's tuned saving with the ramp minus the saving
tuned without it (negative when the other ramps do better without it). Replaying
held-out EfficientNet-Lite0 rows, all 17 ramps as candidates, the exit-rate rule kept
early weak ramps on and released 49% of rows in the first stage (only the three ramps at
its end as candidates: 59%); with marginal savings, 58%.

``decide`` is pure. From each ramp's ``RampStats`` it returns the new active set:
- of the active ramps with enough labelled rows and no utility (``<= 0``), the one with
  the lowest is switched off: one per decision, since two ramps that release the same
  rows each show no marginal saving while the other runs;
- while the active ramps' summed cost exceeds the budget (``ramp_budget`` x the mean
  full-model latency), the one with the lowest utility is switched off;
- an active ramp whose exits save less than ``min_saving`` of the full model's latency
  (measured: its answer to the final one) is switched off, one per decision: a late ramp
  spends the accuracy budget for little (the issue's replay: the last ramp saved 3 ms of
  93), and it is not tried again;
- every ``explore_every``-th decision, one inactive ramp (the one off the longest; not
  one switched off by this decision) is switched on to be measured, if its last
  known cost (or the largest known one) fits. The period doubles for every trial that all
  the candidates have failed since they were last kept (up to ``2**MAX_BACKOFF`` times):
  ramps that keep failing their trials stop churning the active set, and one that was
  kept brings the period back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RampStats:
    active: bool
    samples: int  #: labelled rows this ramp answered in the window
    exit_rate: float  #: fraction of the window's rows it would release
    saved_s: float  #: mean latency saved per exit at this ramp
    cost_s: float | None  #: measured compute time it adds per batch (None: never measured)
    off_since: int = 0  #: the decision number at which it was switched off
    marginal_s: float | None = None  #: tuned saving per row with it minus without it
    trials: int = 0  #: times it was switched off since it was last judged and kept

    @property
    def utility(self) -> float:
        saving = self.exit_rate * self.saved_s if self.marginal_s is None else self.marginal_s
        return saving - (1.0 - self.exit_rate) * (self.cost_s or 0.0)


MAX_BACKOFF = 3


def decide(
    stats: Mapping[int, RampStats],
    budget_s: float,
    decision: int,
    min_samples: int = 64,
    explore_every: int = 8,
    latency_s: float = 0.0,
    min_saving: float = 0.05,
) -> set[int]:
    """The ramps to run after decision number ``decision`` (see module docstring);
    ``latency_s``: the full model's mean latency (0: unknown, no ramp is too late)."""
    active = {site for site, s in stats.items() if s.active}
    floor = min_saving * latency_s

    def too_late(site: int) -> bool:  # what its exits save is measured even while it is off
        return 0 < stats[site].saved_s < floor

    useless = [
        s
        for s in active
        if stats[s].samples >= min_samples and (stats[s].utility <= 0 or too_late(s))
    ]
    if useless:
        active.discard(min(useless, key=lambda s: (stats[s].utility, -s)))
    known = [s.cost_s for s in stats.values() if s.cost_s is not None]

    def cost(site: int) -> float:
        return stats[site].cost_s or 0.0

    while active and sum(cost(s) for s in active) > budget_s:
        active.discard(min(active, key=lambda s: (stats[s].utility, -s)))
    candidates = [s for s in stats if not stats[s].active and not too_late(s)]
    # the period doubles with the trials every candidate has failed since last kept
    backoff = min((min(stats[s].trials, MAX_BACKOFF) for s in candidates), default=0)
    if decision % (explore_every * 2**backoff) == 0:
        off = sorted(
            (s for s in candidates if stats[s].off_since < decision),
            key=lambda s: stats[s].off_since,
        )
        for site in off:
            guess = stats[site].cost_s if stats[site].cost_s is not None else max(known, default=0)
            if sum(cost(s) for s in active) + guess <= budget_s:
                active.add(site)
                break
    return active
