"""The front stage's early-exit controller: release decisions, labelling, tuning, management.

The front sees every ramp answer (its own ramps', and the later stages' ramps' as EXIT
messages) and every final answer, so all online state lives here:

- ``on_ramp``: record a ramp's answer for a row; it says the row is *answered* when the
  ramp is active, the row may exit early, the row has not been answered yet and the
  ramp's error ``1 - max softmax`` is below its threshold. A request is released once
  every one of its rows is answered; the stage then calls ``on_release``, which counts
  one early exit of the request (at its deepest answering ramp): the exit counts and
  ``exitRate`` (early exits per request started) are per request, never per row.
- ``on_final``: the final answer labels every ramp answer of the row (agree or not)
  and adds the row to the window (the last ``window`` labelled rows); the latency a ramp
  saves is measured as the time from its answer to the final one, as a share of the row's
  latency (``saved_s``).
- Every ``every`` labelled rows, with policy ``online``: ``tuner.tune`` on the window
  (budget x ``safety``; each ramp that releases rows counts ``prior`` disagreements it
  has not shown yet: a threshold placed just below a window's first disagreement
  overfits, and over 17 ramps that added up to 2.5% realized loss on EfficientNet-Lite0
  at a 1% budget, 0.5% with the prior; the tuned loss still underestimates what the next
  rows bring: replaying 12 x 9,000 clean EfficientNet-Lite0 rows, the loss after the
  first 3,000 was 1.01% with a safety of 0.8 (60.5% of rows left the first stage); with
  0.75, ``bench/shift_bench.py`` measures 0.62% over 16 x 9,000 (57.8%)), then
  ``manager.decide`` on each ramp's utility, whose saving term is the ramp's marginal
  saving (the tune again without it, for up to ``MARGINALS`` ramps per decision; see
  ``manager``). The window is long (1,024 rows): at a 1% budget, 256 rows hold 2.6
  disagreements, too few to tell a good threshold from a lucky one: a replay of held-out
  EfficientNet-Lite0 rows (shift test off) let 65% of them exit with 1,024 rows (1.0%
  lost) against 57% with 256 (0.67%). The input mix has shifted when a recent stretch of
  the window (the last ``recent`` rows, then 2x, 4x, ... up to half the window) is
  unlikely under the current thresholds in any of three ways: more disagreements than a
  loss at the budget would give, or more disagreements among its early exits than the
  rate per exit at which the older rows' exits would spend the budget (binomial tails
  under ``shift_alpha``), or fewer early exits than the older rows' exit rate gives
  (under ``rate_alpha``). The second test catches a mix on which the ramps' confident
  answers turn wrong while few rows exit (noisy images: about 1 row in 11 exits, a
  quarter of those wrongly) long before the loss per row is unlikely. (Against the older
  rows' own rate per exit, it cut the window 2-7 times in 12,000 clean rows: thresholds
  tuned on those rows keep fewer disagreements than new rows bring.) The third needs no
  disagreement at all: a ramp that turns unsure of the new rows is least to be trusted
  on the few it is still sure of, and the fall is plain at once (noisy images: from 65%
  of rows exiting to 9%, a tail far below 1e-9 within 64 rows). It counts only the ramps
  that answered every row of the window, since a ramp switched off and on again answered
  some stretches only: a ramp with a gap in its answers is left out until the gap leaves
  the window, and with no ramp left the test is off. A rise in exits is not tested (an
  easier mix is no risk). The window is then cut back to that stretch before tuning, so
  the old mix cannot keep thresholds up. A ramp's threshold rises only once the window
  holds rows enough of its answers for two disagreements within the budget
  (``CLIMB_DISAGREEMENTS``: 200 rows at 1%; at the start, after a cut, and for a ramp
  switched on again, whose answers from before still count while in the window; with
  one, a threshold climbed on a lucky stretch of the new mix broke the budget again;
  a ramp that answered part of the window only is held to the budget at its rate over
  the rows it answered: see ``tuner``), and the manager judges a ramp once it has
  answered twice that.
  ``bench/shift_bench.py`` replays the real ramps' answers over 16 seeded shifts from
  3,000 clean EfficientNet-Lite0 test images to 400 noisy ones (the benchmark's shift):
  the loss over every later 100-request window held from a median of 40 requests after
  the shift, against 134 without the exit-count test (1 and 2 of 16 never held), and the
  loss over the noisy rows was 1.4% against 1.8%. Over 16 x 9,000 clean rows of each
  model, neither took a stretch for a shift. (An earlier replay harness measured the
  test per exit and climbs from 200 rows: 64 requests, against 232 with the test per row
  alone.) A plain ratio test (recent loss over 3x the budget: 2 of 64 rows) fired on
  clean rows every few hundred requests and threw the window away each time; a change of
  the active set is passed to ``on_active`` (the stage tells the workers that own the
  ramps), and the thresholds are tuned again on the new set before they are exported (a
  ramp switched off no longer catches rows that a later ramp, tuned with it on, would
  release wrongly). Policy ``fixed`` keeps the starting thresholds and every ramp on.
- Hysteresis: a threshold that fell rises again only once ``need`` rows (the climb's own
  200 at 1%) were labelled since the fall, so the rows that pulled it down cannot push it
  back up; the manager's exploration backs off while the ramps it tries keep failing, and
  a ramp whose exits save under 5% of the full model's latency is switched off (see
  ``manager``). Replaying MiniLM-L6's ramps on another domain (``bench/shift_bench.py``:
  news headlines and debate paragraphs, 8 seeded orders, rows after the first 1,000), the
  active set changed 3.9 times and thresholds turned back 3.7 times per 1,000 rows,
  against 7.5 and 9.2 before, the loss was 0.77% against 0.81% and the worst 1,000-row
  window 1.2% against 1.5%, for fewer early answers (59% against 70%).
- One ramp state per deployment: with several front workers, the control loop names one
  the leader (``lead``) and has every other ``follow`` it: a follower releases rows by the
  leader's thresholds and asks the later stages for the leader's active set, and does not
  tune; it still labels its rows, so that its window is ready should it come to lead.
- Metrics (exits, thresholds, active, agreement) and ``status()`` for the control API.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worldmesh_worker.exits import manager, tuner
from worldmesh_worker.metrics import WorkerMetrics


@dataclass(slots=True)
class _Row:
    early: bool  #: the request allows an early answer
    errs: dict[int, float] = field(default_factory=dict)
    preds: dict[int, int] = field(default_factory=dict)
    at: dict[int, float] = field(default_factory=dict)
    released: int | None = None


MARGINALS = 3  # marginal savings measured per decision
#: ``offload(work, then)``: ``work()`` off the event loop, ``then(its result or None)`` on it.
Offload = Callable[
    [Callable[[], "ExitController"], Callable[["ExitController | None"], None]], None
]
#: a ramp's threshold may rise once it has answered rows enough for this many
#: disagreements within the budget (200 rows at 1%; see the module docstring)
CLIMB_DISAGREEMENTS = 2


class ExitController:
    def __init__(
        self,
        sites: Sequence[int],
        thresholds: dict[int, float],
        metrics: WorkerMetrics,
        *,
        budget: float = 0.01,
        ramp_budget: float = 0.1,
        policy: str = "online",
        window: int = 1024,
        every: int = 32,
        safety: float = 0.75,
        recent: int = 64,
        shift_alpha: float = 1e-3,
        rate_alpha: float = 1e-9,
        prior: float = 1.0,
        on_active: Callable[[list[int]], None] = lambda active: None,
        clock: Callable[[], float] = time.monotonic,
        offload: Offload | None = None,
    ) -> None:
        """``offload(work, then)``: run ``work()`` off the event loop, then ``then(result)``
        back on it (the stage's tuning thread); None tunes inline (tests, replays)."""
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"accuracy budget {budget} is not within [0, 1]")
        if policy not in ("online", "fixed"):
            raise ValueError(f"policy {policy!r} is not online or fixed")
        if not (0.0 < safety <= 1.0 and 0.0 <= shift_alpha <= 1.0 and 0.0 <= rate_alpha <= 1.0):
            raise ValueError(
                f"safety {safety}, shift_alpha {shift_alpha}, rate_alpha {rate_alpha}: "
                "need a safety within (0, 1] and alphas within [0, 1]"
            )
        if prior < 0.0:
            raise ValueError(f"prior {prior} is negative")
        if recent < 1 or every < 1 or window < 2 * recent:
            raise ValueError(
                f"window {window}, recent {recent}, every {every}: need recent >= 1, "
                "every >= 1 and a window of at least twice the recent stretch"
            )
        self.sites = sorted(sites)
        self.levels = [tuner.level_of(thresholds[s]) for s in self.sites]
        self.values = {s: float(thresholds[s]) for s in self.sites}  # exact until tuned
        self.active = set(self.sites)
        self.metrics = metrics
        self.budget, self.ramp_budget, self.policy = budget, ramp_budget, policy
        self.every, self.safety = every, safety
        self.recent, self.shift_alpha, self.prior = recent, shift_alpha, prior
        self.rate_alpha = rate_alpha
        self.cuts = 0  # times a shift cut the window back to its recent rows
        self.on_active = on_active
        self.clock = clock
        self.rows: dict[int, _Row] = {}
        self.window: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=window)
        # EMA of the share of a row's latency an exit at the ramp saves (see ``saved_s``)
        self.share = dict.fromkeys(self.sites, 0.0)
        self.cost: dict[int, float | None] = dict.fromkeys(self.sites)  # EMA, s per batch
        self.latency = 0.0  # EMA of the full-model latency
        self.exits = dict.fromkeys(self.sites, 0)
        self.seen = dict.fromkeys(self.sites, 0)  # labelled rows each ramp answered
        self.off_since = dict.fromkeys(self.sites, 0)
        self.trials = dict.fromkeys(self.sites, 0)  # times switched off since last kept
        self.fell_at = dict.fromkeys(self.sites, -(10**9))  # labelled count at its last fall
        self.labelled = 0
        self.requests = 0  # requests started (the denominator of ``exitRate``)
        self.decisions = 0
        self._starts: dict[int, float] = {}
        self.offload = offload
        self._tuning = False  # a tune runs off the loop: the next one waits for it
        self._tune_again = False
        self.leader: str | None = None  # the front worker whose ramp state this one follows
        self._export()

    def threshold(self, site: int) -> float:
        return self.values[site]

    # -- rows ------------------------------------------------------------------------

    def start(self, row: int, early: bool) -> None:
        self.rows[row] = _Row(early)
        self._starts[row] = self.clock()

    def start_request(self, rows: Sequence[int], early: bool) -> None:
        """Start one request's rows (``start`` each) and count the request."""
        self.requests += 1
        for row in rows:
            self.start(row, early)

    def on_release(self, site: int) -> None:
        """A request was answered early, by ramp ``site`` (its deepest answering ramp)."""
        if site in self.exits:
            self.exits[site] += 1
            self.metrics.early_exits(site)

    def on_ramp(self, row: int, site: int, probs_max: float, pred: int) -> bool:
        """Record a ramp answer; True when it answers the row (see module docstring)."""
        track = self.rows.get(row)
        if track is None or site not in self.cost:
            return False
        err = 1.0 - probs_max
        track.errs[site], track.preds[site], track.at[site] = err, pred, self.clock()
        if (
            track.early
            and track.released is None
            and site in self.active
            and err < self.threshold(site)
        ):
            track.released = site
            return True
        return False

    def on_cost(self, site: int, seconds: float) -> None:
        if site in self.cost:
            old = self.cost[site]
            self.cost[site] = seconds if old is None else 0.95 * old + 0.05 * seconds

    def drop(self, row: int) -> None:
        self.rows.pop(row, None)
        self._starts.pop(row, None)

    def on_final(self, row: int, label: int) -> None:
        track = self.rows.pop(row, None)
        start = self._starts.pop(row, None)
        if track is None or start is None:
            return
        now = self.clock()
        took = now - start
        self.latency = _ema(self.latency, took, self.labelled)
        errs = np.full(len(self.sites), np.nan)
        agree = np.zeros(len(self.sites), dtype=bool)
        for i, site in enumerate(self.sites):
            if site in track.errs:
                errs[i] = track.errs[site]
                agree[i] = track.preds[site] == label
                if took > 0:
                    share = min(1.0, (now - track.at[site]) / took)
                    self.share[site] = _ema(self.share[site], share, self.seen[site])
                self.seen[site] += 1
        self.window.append((errs, agree))
        self.labelled += 1
        if self.labelled % self.every == 0:
            if self.policy == "online" and self.leader is None:
                self._retune_due()
            else:
                self._export()

    # -- tuning off the event loop -------------------------------------------------------

    def _retune_due(self) -> None:
        """Retune now: inline, or (with ``offload``) on a copy off the event loop, whose
        decision is adopted back on it. A decision took up to 250 ms in the first climbs
        (see ``retune``): on the loop, it held up every request and control call."""
        if self.offload is None:
            self.retune()
            return
        if self._tuning:
            self._tune_again = True
            return
        self._tuning = True
        trial, labelled = self._trial(), self.labelled

        def work() -> ExitController:
            trial.retune()
            return trial

        self.offload(work, lambda tuned: self._adopt(tuned, labelled))

    def _trial(self) -> ExitController:
        """A copy to tune: the state a retune changes is its own; no callbacks, no export."""
        trial = copy.copy(self)
        trial.window = deque(self.window, maxlen=self.window.maxlen)
        trial.levels = list(self.levels)
        trial.values = dict(self.values)
        trial.active = set(self.active)
        trial.off_since = dict(self.off_since)
        trial.trials, trial.fell_at = dict(self.trials), dict(self.fell_at)
        trial.share, trial.cost = dict(self.share), dict(self.cost)
        trial.on_active = lambda active: None
        trial._export = lambda: None  # type: ignore[method-assign]
        trial.offload = None
        return trial

    def _adopt(self, tuned: ExitController | None, labelled: int) -> None:
        """Take a tune's decision (on the loop); None: it failed, nothing changes (nor
        while following another front worker, which decides for this one now)."""
        self._tuning = False
        if tuned is not None and self.leader is None:
            if tuned.cuts > self.cuts:  # a shift: keep its recent rows and the newer ones
                keep = len(tuned.window) + (self.labelled - labelled)
                while len(self.window) > keep:
                    self.window.popleft()
            self.levels, self.values = tuned.levels, tuned.values
            self.off_since, self.cuts, self.decisions = tuned.off_since, tuned.cuts, tuned.decisions
            self.trials, self.fell_at = tuned.trials, tuned.fell_at
            if tuned.active != self.active:
                self.active = tuned.active
                self.on_active(sorted(self.active))
            self._export()
        if self._tune_again:
            self._tune_again = False
            self._retune_due()

    # -- one ramp state per deployment -----------------------------------------------------

    def follow(self, leader: str, thresholds: dict[int, float], active: Sequence[int]) -> None:
        """Apply the ramp state front worker ``leader`` tuned: every ramp's threshold, and
        the active set (told to the later stages when it changes here). ``ValueError``
        naming what is wrong, with nothing changed, for a state of other ramps."""
        if set(thresholds) != set(self.sites):
            raise ValueError(
                f"ramps: the state names ramps {sorted(thresholds)}, this deployment has "
                f"{self.sites}"
            )
        if not set(active) <= set(self.sites):
            raise ValueError(f"active: {sorted(set(active) - set(self.sites))} are not ramps here")
        for site, value in thresholds.items():
            if not (isinstance(value, float | int) and 0.0 <= value <= 1.0):
                raise ValueError(f"ramp {site}: threshold {value!r} is not within [0, 1]")
        self.leader = leader
        self.values = {s: float(thresholds[s]) for s in self.sites}
        self.levels = [tuner.level_of(self.values[s]) for s in self.sites]
        if set(active) != self.active:
            self.active = set(active)
            self.on_active(sorted(self.active))
        self._export()

    def lead(self) -> None:
        """Tune from here on (from the state last followed, on this worker's own window)."""
        self.leader = None

    # -- control ---------------------------------------------------------------------

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.window:
            return np.zeros((0, len(self.sites))), np.zeros((0, len(self.sites)), dtype=bool)
        return np.stack([e for e, _ in self.window]), np.stack([a for _, a in self.window])

    def saved_s(self, site: int) -> float:
        """The latency an exit at ``site`` saves: the share of a row's latency its exits
        saved (EMA) times the full model's mean latency now.

        A share, not seconds: seconds measured while a ramp was on carry that time's load,
        and a ramp switched off keeps them. At the end of the exits benchmark (closed-loop
        rounds of 8 clients between runs at a low rate), MPNet-base's active ramp 5 showed
        102-112 ms saved against 437-486 ms for ramp 4, before it in the same stage, in
        each of 3 runs, and MiniLM-L6's active ramp 0 36-39 ms against 89-91 ms for the
        idle ramp 1 after it: ramps were judged by when they were measured, not by where
        they sit. As shares, every ramp is priced at the same (current) latency, and in
        the next such benchmark they fell from stage to stage in every run of every model
        (each below every ramp of an earlier stage; MPNet-base: 0.94-0.97 after layer 0,
        0.74-0.78 after layer 3, 0.23-0.27 after layer 9)."""
        return self.share[site] * self.latency

    def retune(self) -> None:
        errs, agree = self._arrays()
        active = np.array([s in self.active for s in self.sites])
        errs = np.where(active, errs, np.nan)  # an off ramp answers nothing
        saved = np.array([self.saved_s(s) for s in self.sites])
        # A shift in the input mix: recent rows break the budget, their exits turn wrong,
        # or far fewer of them exit, beyond chance. The older rows no longer say what the
        # thresholds do, so tune on the recent ones only.
        recent = self._shifted(errs, agree, saved)
        if recent is not None:
            errs, agree = errs[-recent:], agree[-recent:]
            for _ in range(len(self.window) - recent):
                self.window.popleft()
            self.cuts += 1
        # a ramp's threshold rises only once it has answered enough rows that
        # ``CLIMB_DISAGREEMENTS`` are within the budget: fewer rows would overfit
        need = max(self.recent, CLIMB_DISAGREEMENTS / max(self.budget, 1e-9))
        climb = np.isfinite(errs).sum(axis=0) >= need
        # hysteresis: a threshold that fell rises again only on ``need`` rows labelled since
        # the fall (the rows that made it fall are no evidence that it may rise)
        climb &= np.array([self.labelled - self.fell_at[s] >= need for s in self.sites])
        before = list(self.levels)
        self.levels = tuner.tune(
            errs, agree, self.levels, saved, self.budget * self.safety, active, climb, self.prior
        )
        self.values = {
            s: float(tuner.LEVELS[lv]) for s, lv in zip(self.sites, self.levels, strict=True)
        }
        self.decisions += 1
        _, saving, counts = tuner.evaluate(errs, agree, tuner.LEVELS[self.levels], saved)
        # judge a ramp only once its threshold could climb: twice the rows (400 at 1%, more
        # than the 8 decisions between two explorations: two explored ramps may be on)
        judged = int(2 * need)
        samples = np.isfinite(errs).sum(axis=0)
        # a ramp's marginal saving: one more tune per judged ramp that releases rows (one
        # that releases none adds nothing), for at most ``MARGINALS`` of them per decision
        # (those whose exit rate x saving is least; the others keep that as their saving
        # term). Replaying held-out EfficientNet-Lite0 rows with 17 ramps, a decision took
        # 3 ms at the median and up to 250 ms in the first climbs from closed thresholds.
        judge = [
            i
            for i, site in enumerate(self.sites)
            if site in self.active and samples[i] >= judged and counts[i] > 0
        ]
        judge = sorted(judge, key=lambda i: counts[i] * saved[i])[:MARGINALS]
        marginal = {
            self.sites[i]: saving - self._saving_without(i, errs, agree, saved, active, climb)
            for i in judge
        }
        stats = {
            site: manager.RampStats(
                active=site in self.active,
                samples=int(samples[i]),
                exit_rate=float(counts[i]) / max(1, len(errs)),
                saved_s=float(saved[i]),
                cost_s=self.cost[site],
                off_since=self.off_since[site],
                marginal_s=marginal.get(site),
                trials=self.trials[site],
            )
            for i, site in enumerate(self.sites)
        }
        chosen = manager.decide(
            stats, self.ramp_budget * self.latency, self.decisions, judged, latency_s=self.latency
        )
        for site in self.active & chosen:
            if samples[self.sites.index(site)] >= judged:
                self.trials[site] = 0  # judged and kept: worth trying again soon if it goes
        if chosen != self.active:
            for site in self.active - chosen:
                self.off_since[site] = self.decisions
                self.trials[site] += 1
            started = np.array([s in chosen - self.active for s in self.sites])
            for site in chosen - self.active:  # a ramp tried again starts closed: no data yet
                self.levels[self.sites.index(site)] = 0
            self.active = chosen
            # tune again on the new set: the rows a ramp switched off released now reach
            # later ramps, whose thresholds were tuned while it caught those rows
            on = np.array([s in chosen for s in self.sites])
            self.levels = tuner.tune(
                np.where(on, errs, np.nan),
                agree,
                self.levels,
                saved,
                self.budget * self.safety,
                on,
                climb & on & ~started,
                self.prior,
            )
            self.values = {
                s: float(tuner.LEVELS[lv]) for s, lv in zip(self.sites, self.levels, strict=True)
            }
            self.on_active(sorted(chosen))
        for i, site in enumerate(self.sites):
            if self.levels[i] < before[i]:
                self.fell_at[site] = self.labelled
        self._export()

    def _shifted(self, errs: np.ndarray, agree: np.ndarray, saved: np.ndarray) -> int | None:
        """The shortest recent stretch of the window (``recent`` rows, then 2x, 4x, ... up
        to half the window) whose disagreements under the current thresholds are too many
        (binomial tail under ``shift_alpha``) for a loss at the budget, or for its exits
        at the rate per exit that would spend the budget at the older rows' exit rate, or
        whose exits are too few for the older rows' exit rate (tail under ``rate_alpha``);
        None if none is."""
        thresholds = tuner.LEVELS[self.levels]
        # exit rates compare alike only over the ramps that answered every row of the
        # window: a ramp switched off and on again has answers in some stretches only
        steady = np.isfinite(errs).all(axis=0)

        def counts(rows: int) -> tuple[int, int, int]:
            """(disagreements, exits, exits at the steady ramps) of the last ``rows``."""
            loss, _, exits = tuner.evaluate(errs[-rows:], agree[-rows:], thresholds, saved)
            at_steady = 0
            if steady.any():
                at_steady = int(
                    tuner.evaluate(
                        errs[-rows:, steady],
                        agree[-rows:, steady],
                        thresholds[steady],
                        saved[steady],
                    )[2].sum()
                )
            return round(loss * rows), int(exits.sum()), at_steady

        _, all_exits, all_steady = counts(len(errs))
        span = self.recent
        while span <= len(errs) // 2:
            wrong, exits, steady_exits = counts(span)
            older = len(errs) - span
            # the rate per exit at which the older rows' exits would spend the budget
            per_exit = min(1.0, self.budget * older / max(1, all_exits - exits))
            # how often the older rows pass every steady ramp without exiting (with one
            # pass and one exit more seen: if every older row exited, one row that does
            # not would otherwise be impossible)
            stay = (older - (all_steady - steady_exits) + 1) / (older + 2)
            if (
                _tail(wrong, span, self.budget) < self.shift_alpha
                or _tail(wrong, exits, per_exit) < self.shift_alpha
                or _tail(span - steady_exits, span, stay) < self.rate_alpha
            ):
                return span
            span *= 2
        return None

    def _saving_without(
        self,
        i: int,
        errs: np.ndarray,
        agree: np.ndarray,
        saved: np.ndarray,
        active: np.ndarray,
        climb: np.ndarray,
    ) -> float:
        """The window's saving per row, tuned with ramp ``i`` switched off."""
        on = active.copy()
        on[i] = False
        levels = list(self.levels)
        levels[i] = 0
        off = np.where(on, errs, np.nan)
        budget = self.budget * self.safety
        levels = tuner.tune(off, agree, levels, saved, budget, on, climb & on, self.prior)
        return tuner.evaluate(off, agree, tuner.LEVELS[levels], saved)[1]

    def _agreement(self) -> dict[int, float | None]:
        errs, agree = self._arrays()
        out: dict[int, float | None] = {}
        for i, site in enumerate(self.sites):
            seen = np.isfinite(errs[:, i]) if len(errs) else np.zeros(0, dtype=bool)
            out[site] = float(agree[seen, i].mean()) if seen.any() else None
        return out

    def _export(self) -> None:
        agreement = self._agreement()
        for site in self.sites:
            self.metrics.ramp(site, self.threshold(site), site in self.active, agreement[site])

    def status(self) -> dict[str, Any]:
        agreement = self._agreement()
        total = max(1, self.requests)
        return {
            "policy": self.policy,
            "leader": self.leader,
            "accuracyBudget": self.budget,
            "rampBudget": self.ramp_budget,
            "labelled": self.labelled,
            "window": len(self.window),
            "shiftCuts": self.cuts,
            "ramps": [
                {
                    "ramp": site,
                    "active": site in self.active,
                    "threshold": self.threshold(site),
                    "exits": self.exits[site],
                    "exitRate": self.exits[site] / total,
                    "agreement": agreement[site],
                    "savedShare": self.share[site],
                    "savedSeconds": self.saved_s(site),
                    "costSeconds": self.cost[site],
                }
                for site in self.sites
            ],
        }


def _tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely ``k`` disagreements in ``n`` rows are
    at a true loss of ``p``. Summed in log space: ``comb(n, i) * p**i`` overflows a float
    for a few thousand rows."""
    if not 0.0 <= p <= 1.0:  # NaN too: never read as "unlikely"
        raise ValueError(f"binomial rate {p} is not a probability")
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)

    def log_pmf(i: int) -> float:
        return (
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * log_p
            + (n - i) * log_q
        )

    # the shorter side of the sum, for precision in the far tail
    if k > n * p:
        return min(1.0, sum(math.exp(log_pmf(i)) for i in range(k, n + 1)))
    return max(0.0, 1.0 - sum(math.exp(log_pmf(i)) for i in range(k)))


def _ema(old: float, value: float, count: int) -> float:
    """A running mean over the first rows, then an exponential one (weight 1/20)."""
    return old + (value - old) / min(count + 1, 20)
