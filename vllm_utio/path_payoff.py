"""Which of two ways to run a step is faster, measured per step size, re-checked now and
then (used by the probe's routing and by self-speculation's drafting).

Each decided step reports its seconds and the units it produced (tokens); a size class's
running seconds per unit on each path is an exponential average. Sizes up to
``exact_upto`` are classes of their own, larger ones share powers of two (5-8, 9-16, ...):
where a step has a large fixed cost its time per unit falls with its size, so a class that
mixes sizes would compare one path measured at 8 rows with the other measured at 5.
Once both paths are measured, the faster one runs (the alternative only when faster by
``margin``: it may cost what a step's own timing does not see); the other is measured
again after 8 steps of the class, then after 16, 32, ... up to 128 while the verdict
holds, back to 8 when it flips. A measurement (a path's first, or a re-check) may span
up to ``measure_steps`` steps, ending early once they took ``measure_s`` seconds, and
keeps their median time per unit: where single steps are short and noisy (batch 1), one
slow step would otherwise decide the next 8-128; long steps (large batches) are steady,
and measuring the losing path longer would only cost more. With ``seed_nearest`` a size
class seen for the first time runs the path its nearest measured class runs, and
measures the other path only after 8 steps of its own: where the alternative itself
makes new sizes (drafting: rows that accept different counts finish apart, leaving a
batch's last steps with 30, 17, 3 rows), measuring it first in each would run it most
where it loses most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median
from typing import Literal

FIRST_RECHECK = 8  # steps of a size class before the losing path is measured again
LAST_RECHECK = 128
EMA_WEIGHT = 0.25  # weight of the newest step in a path's running time per unit


@dataclass
class PathTimes:
    """Running seconds per unit of one size class on each path (None: not yet run)."""

    base_s: float | None = None
    alt_s: float | None = None
    since_check: int = 0  # steps since the losing path last ran
    recheck_every: int = FIRST_RECHECK
    checking: bool = False  # the losing path runs to be re-measured
    check_alt: bool = False  # which path that is
    # a new class's path for its first ``recheck_every`` steps (its nearest measured
    # class's winner; alt: True); None after them, or where the class was not seeded
    first: bool | None = None
    # per path (alt: True), the running measurement's steps: (seconds, time per unit)
    windows: dict[bool, list[tuple[float, float]]] = field(
        default_factory=lambda: {False: [], True: []}
    )

    def alt_wins(self, margin: float = 1.0) -> bool | None:
        """Is the alternative faster than the base path by at least ``margin``?"""
        if self.base_s is None or self.alt_s is None:
            return None
        return self.alt_s * margin < self.base_s


def size_class(size: int, exact_upto: int = 0) -> int:
    """The class of ``size``, named by its largest size: ``size`` itself up to
    ``exact_upto``, else the power of two at or above it."""
    if size <= exact_upto:
        return size
    return 1 << max(size - 1, 0).bit_length()


class PathPayoff:
    """Decides, per step, between a base path and an alternative (``alt``), see the doc.
    ``base``/``alt`` name the paths in :meth:`as_dict`; the alternative runs only while it
    measures ``margin`` times as fast as the base (1.0: any faster); sizes up to
    ``exact_upto`` are each their own class (:func:`size_class`); a measurement spans up
    to ``measure_steps`` steps or ``measure_s`` seconds (their median)."""

    def __init__(
        self,
        mode: Literal["measured", "always"],
        base: str,
        alt: str,
        margin: float = 1.0,
        exact_upto: int = 0,
        measure_steps: int = 1,
        measure_s: float | None = None,
        seed_nearest: bool = False,
    ) -> None:
        self.mode = mode
        self.seed_nearest = seed_nearest
        self.measure_steps = measure_steps
        self.measure_s = measure_s
        self.margin = margin
        self.exact_upto = exact_upto
        self.names = (base, alt)
        self.classes: dict[int, PathTimes] = {}
        self.declined_steps = 0  # steps run on the base path because alt did not pay
        self.recheck_steps = 0  # steps run on a path to measure it (first time or again)

    def choose(self, size: int) -> bool:
        """Run this step on the alternative path?"""
        if self.mode == "always":
            return True
        times = self._times(size)
        if times.first is not None:
            if times.since_check < times.recheck_every:
                times.since_check += 1
                self.declined_steps += int(not times.first)
                return times.first
            times.first, times.since_check = None, 0  # now measure the other path
        if times.alt_s is None:
            return True  # measure the alternative first, then the base
        if times.base_s is None:
            self.recheck_steps += 1
            return False
        if times.checking:  # a re-check's measurement is still running
            self.recheck_steps += 1
            return times.check_alt
        wins = bool(times.alt_wins(self.margin))
        times.since_check += 1
        if times.since_check >= times.recheck_every:
            times.since_check = 0
            times.checking, times.check_alt = True, not wins
            self.recheck_steps += 1
            return not wins
        self.declined_steps += int(not wins)
        return wins

    def observe(self, size: int, alt: bool, seconds: float, units: float) -> None:
        """A decided step's time and what it produced, on the path ``choose`` chose."""
        if self.mode == "always" or size <= 0 or units <= 0:
            return
        times = self._times(size)
        per_unit = seconds / units
        attr = "alt_s" if alt else "base_s"
        old = getattr(times, attr)
        checked = times.checking and alt == times.check_alt
        if old is not None and not checked:
            setattr(times, attr, (1 - EMA_WEIGHT) * old + EMA_WEIGHT * per_unit)
            return
        # a path not run for a while: its old time is stale (the batch's contexts and the
        # machine's load have moved on since), so its measurement replaces it
        window = times.windows[alt]
        window.append((seconds, per_unit))
        lasted = sum(s for s, _ in window)
        long_enough = self.measure_s is not None and lasted >= self.measure_s
        if len(window) < self.measure_steps and not long_enough:
            return
        before = times.alt_wins(self.margin)
        setattr(times, attr, median(u for _, u in window))
        times.windows[alt] = []
        if checked:  # a re-measured losing path: back off while the verdict holds
            times.checking = False
            held = times.alt_wins(self.margin) == before
            times.recheck_every = (
                min(2 * times.recheck_every, LAST_RECHECK) if held else FIRST_RECHECK
            )

    def _times(self, size: int) -> PathTimes:
        """The class of ``size``; a new one seeded with its nearest class's verdict."""
        cls = size_class(size, self.exact_upto)
        times = self.classes.get(cls)
        if times is None:
            times = self.classes[cls] = PathTimes(first=self._nearest_verdict(cls))
        return times

    def _nearest_verdict(self, cls: int) -> bool | None:
        """Whether the alternative wins in the nearest class with both paths measured
        (None: seeding off, or no such class)."""
        if not self.seed_nearest:
            return None
        decided = [k for k, t in self.classes.items() if t.alt_wins(self.margin) is not None]
        if not decided:
            return None
        nearest = min(decided, key=lambda k: (abs(k - cls), k))
        return bool(self.classes[nearest].alt_wins(self.margin))

    def as_dict(self) -> dict[str, object]:
        """Counters and per size class (named by its largest size) µs per unit on each
        path."""
        base, alt = self.names
        per_class = {
            str(k): {
                f"{base}_us_per_token": None if t.base_s is None else 1e6 * t.base_s,
                f"{alt}_us_per_token": None if t.alt_s is None else 1e6 * t.alt_s,
                "recheck_every": t.recheck_every,
            }
            for k, t in sorted(self.classes.items())
        }
        return {
            "mode": self.mode,
            "margin": self.margin,
            "declined_steps": self.declined_steps,
            "recheck_steps": self.recheck_steps,
            "size_classes": per_class,
        }
