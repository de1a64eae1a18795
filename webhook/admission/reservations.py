"""Reservations only for pods the API server persists.

A validating review that admits a pod holds one IP in its zone until the watch shows the pod. A review the
API server never persisted (made up by a pod that can reach the Service, or refused by a later admission
step) would hold it for the whole reservation TTL. So each new reservation must be confirmed: if the watch
has not shown its pod within ``reservationConfirmSeconds`` it is released; and while a zone already has
``maxUnconfirmedReservations`` unconfirmed ones, /validate judges without reserving (the decision itself is
unchanged: a pod is never denied for want of a reservation).

O(log n) per review at most: confirmation is a dict lookup in the index's pods; entries leave in deadline
order.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from webhook.model.index import CapacityIndex


@dataclass(slots=True)
class ReservationGuard:
    index: CapacityIndex
    clock: Callable[[], float] = time.monotonic
    # zone -> {pod key: confirmation deadline}, for reservations the watch has not confirmed yet
    unconfirmed: dict[str, dict[str, float]] = field(default_factory=dict)
    released: int = 0  # reservations released because their pod never showed
    skipped: Counter[str] = field(default_factory=Counter)  # per zone: admitted without a reservation
    _deadlines: list[tuple[float, str, str]] = field(default_factory=list)  # a heap: the window may change
    _walked: dict[str, int] = field(default_factory=dict)  # zone -> index version when last looked through

    def reserve(self, key: str, zone: str, node: str | None, *, window: float, limit: int) -> bool:
        """Hold the pod's IP unless its zone is at its bound of unconfirmed reservations; True when held."""
        self.sweep()
        for other, waiting in self.unconfirmed.items():
            if other != zone:
                # The same pod reserved again in another zone (a create refused after admission, then retried):
                # the earlier zone's window must not release the new reservation.
                waiting.pop(key, None)
        pending = self.unconfirmed.setdefault(zone, {})
        if key not in pending and len(pending) >= limit:
            self._confirm_seen(zone)
            if len(pending) >= limit:
                self.skipped[zone] += 1
                return False
        deadline = self.clock() + window
        pending[key] = deadline
        heapq.heappush(self._deadlines, (deadline, zone, key))
        self.index.reserve(key, zone, node)
        return True

    def sweep(self) -> None:
        """Release the reservations whose confirmation window passed without the watch showing their pod."""
        now = self.clock()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, zone, key = heapq.heappop(deadlines)
            pending = self.unconfirmed.get(zone)
            if pending is None or pending.get(key) != deadline:
                continue  # confirmed early, or reserved again since (a later entry stands for it)
            del pending[key]
            if key not in self.index.pods:
                self.index.release(key)
                self.released += 1

    def _confirm_seen(self, zone: str) -> None:
        # Only at the bound: forget the entries whose pods the watch has shown (at most `limit` lookups), and
        # only when the index changed since the last look (a flood at the bound changes nothing there).
        if self._walked.get(zone) == self.index.version:
            return
        self._walked[zone] = self.index.version
        pending = self.unconfirmed[zone]
        for key in [k for k in pending if k in self.index.pods]:
            del pending[key]

    def counts(self) -> dict[str, int]:
        """Unconfirmed reservations per zone (entries whose pods were shown count until their deadline)."""
        self.sweep()
        return {zone: len(pending) for zone, pending in self.unconfirmed.items()}
