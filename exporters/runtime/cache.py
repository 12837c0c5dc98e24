"""One MoE layer's expert cache: which experts hold a slot, and which one a miss evicts.

Bookkeeping only (the store keeps the tensors). The semantics are the project's hit-rate
contract (profiles/workload/hitrate.py), so the simulator and this runtime count alike:

- an **access** is one (token, expert) reference of a cached expert (site ``fetch`` or
  ``hybrid``); a step's tokens are walked in order and each token's top-k in rank order
  (the order of ``top_k_index``); resident, local and stream experts are not accesses;
- **demand loading**: a miss loads the expert into the cache, evicting one when the
  ``slots`` are full (with 0 slots nothing is kept); the cache is never reset between
  sequences;
- eviction policies: ``lru`` (least recently used); ``lfu`` (fewest uses over the whole
  past, evicted experts keep their count; ties: least recently used); ``belady`` (the one
  used again furthest in the future, from a reference string given in advance; never used
  again = evicted first, the larger expert id first); ``static`` (a fixed set: the
  ``slots`` most frequent experts of a given routing, loaded beforehand and never replaced;
  without a routing, the first ``slots`` experts missed are kept for good).

A prefetch (:meth:`ExpertCache.insert`) loads an expert without counting an access.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence

__all__ = ["POLICIES", "ExpertCache", "register_policy"]

# name -> victim chooser(cache) -> expert id to evict (the cache is full and not static)
POLICIES: dict[str, Callable[[ExpertCache], int]] = {}


def register_policy(name: str, victim: Callable[[ExpertCache], int]) -> None:
    """Add an eviction policy; names are unique."""
    if name in POLICIES:
        raise ValueError(f"eviction policy {name!r} is already registered")
    POLICIES[name] = victim


class ExpertCache:
    """Slots of one layer under one eviction policy.

    Args:
        slots: how many experts the cache holds.
        policy: ``lru``, ``lfu``, ``belady`` or ``static``.
        future: the layer's reference string (expert ids of the cached accesses, in access
            order) for ``belady``; also gives ``static`` its frequencies.
        frequency: access counts per expert id for ``static`` (overrides ``future``).
    """

    def __init__(self, slots: int, policy: str = "lru", *, future: Sequence[int] | None = None,
                 frequency: Sequence[float] | None = None) -> None:
        if policy not in POLICIES and policy != "static":
            raise ValueError(f"unknown eviction policy {policy!r}; known: {', '.join([*POLICIES, 'static'])}")
        if policy == "belady" and future is None:
            raise ValueError("belady needs the routing in advance (future=...)")
        self.slots = int(slots)
        self.policy = policy
        self.members: set[int] = set()
        self.clock = 0  # accesses so far: the position in the reference string
        self.last_use: dict[int, int] = {}
        self.uses: dict[int, int] = {}
        self.hits = 0
        self.misses = 0
        self._next: dict[int, list[int]] = {}
        if future is not None:
            for pos, e in enumerate(future):
                self._next.setdefault(int(e), []).append(pos)
        self._horizon = len(future) if future is not None else 0
        self.frozen = False
        if policy == "static" and (frequency is not None or future is not None):
            if frequency is None:
                counts: dict[int, int] = {}
                for e in future:
                    counts[int(e)] = counts.get(int(e), 0) + 1
                ranked = sorted(counts, key=lambda e: (-counts[e], e))
            else:
                ranked = sorted((e for e, f in enumerate(frequency) if f > 0), key=lambda e: (-frequency[e], e))
            self.members = set(ranked[:self.slots])
            self.frozen = True

    def __contains__(self, expert: int) -> bool:
        return expert in self.members

    def access(self, expert: int) -> tuple[bool, list[int], bool]:
        """Count one access. Returns ``(hit, evicted experts, loaded)``: ``loaded`` when a
        miss brought the expert into the cache."""
        hit = expert in self.members
        evicted: list[int] = []
        loaded = False
        if hit:
            self.hits += 1
        else:
            self.misses += 1
            loaded, evicted = self._load(expert)
        self.last_use[expert] = self.clock
        self.uses[expert] = self.uses.get(expert, 0) + 1
        self.clock += 1
        return hit, evicted, loaded

    def insert(self, expert: int) -> tuple[bool, list[int]]:
        """Prefetch: load ``expert`` without counting an access. Returns ``(loaded, evicted)``."""
        if expert in self.members:
            return False, []
        loaded, evicted = self._load(expert)
        if loaded:
            self.last_use[expert] = self.clock - 0.5  # more recent than every past access
        return loaded, evicted

    def _load(self, expert: int) -> tuple[bool, list[int]]:
        if self.slots <= 0 or self.frozen:
            return False, []
        evicted = []
        if len(self.members) >= self.slots:
            victim = POLICIES[self.policy](self)
            self.members.discard(victim)
            evicted.append(victim)
        self.members.add(expert)
        if self.policy == "static" and len(self.members) >= self.slots:
            self.frozen = True  # no routing given: the first experts missed stay for good
        return True, evicted

    def next_use(self, expert: int) -> int:
        """Position of the expert's next access after the current one (belady)."""
        positions = self._next.get(expert, [])
        i = bisect.bisect_right(positions, self.clock - 1)
        return positions[i] if i < len(positions) else self._horizon + 1 + expert

    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None

    def preloaded(self) -> Iterable[int]:
        """Experts a ``static`` cache holds before the first access."""
        return sorted(self.members) if self.policy == "static" else []


register_policy("lru", lambda c: min(c.members, key=lambda e: c.last_use.get(e, -1)))
register_policy("lfu", lambda c: min(c.members, key=lambda e: (c.uses.get(e, 0), c.last_use.get(e, -1))))
register_policy("belady", lambda c: max(c.members, key=c.next_use))
