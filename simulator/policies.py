"""Pluggable policies: expert-cache eviction, prefetch and miss handling.

Each family is a plain dict from name to one function (or class); :func:`register` refuses
a duplicate name, so adding a policy is one function and one line.

Cache semantics (the contract of :mod:`profiles.workload.hitrate`): every MoE layer has its
own cache of ``slots`` experts; accesses are served one after another ("rank order"); a
miss loads the expert, evicting one when the cache is full. With the same reference string,
the ``lru`` and ``belady`` caches here give exactly the hits of the workload module's curves.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

from profiles.errors import InputError

__all__ = ["EVICTION", "MISS", "PREFETCH", "ExpertCache", "make_cache", "register"]

EVICTION: dict[str, type[ExpertCache]] = {}
PREFETCH: dict[str, Callable] = {}
MISS: dict[str, Callable] = {}


def register(registry: dict, name: str):
    """Decorator: add an entry to ``registry`` under ``name``; a second entry of that name is refused."""
    def add(obj):
        if name in registry:
            raise ValueError(f"policy {name!r} is already registered")
        registry[name] = obj
        return obj
    return add


def _choose(registry: dict, name: str, key: str):
    if name not in registry:
        raise InputError("unknown policy", key=key, value=name, expected=", ".join(sorted(registry)),
                         fix=f"pick one of {', '.join(sorted(registry))}")
    return registry[name]


# --------------------------------------------------------------------------- eviction


class ExpertCache:
    """A per-layer cache of ``slots`` experts. Subclasses choose the victim.

    ``access(e, pos, gate)`` returns whether ``e`` was cached and, on a miss, loads it
    (evicting when full). ``insert(e, pos)`` loads without counting an access (prefetch).
    ``pos`` is the access's position in the workload (token x K + rank) for oracles.
    """

    def __init__(self, slots: int, **_: object) -> None:
        self.slots = int(slots)
        self.items: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def __contains__(self, e: int) -> bool:
        return e in self.items

    def access(self, e: int, pos: int = 0, gate: float = 1.0) -> bool:
        if e in self.items:
            self.items.move_to_end(e)
            self._touched(e, pos, gate)
            return True
        self._load(e, pos, gate)
        return False

    def insert(self, e: int, pos: int = 0) -> bool:
        """Load ``e`` ahead of use (prefetch); returns whether it had to be loaded."""
        if e in self.items or self.slots == 0:
            return False
        self._load(e, pos, 0.0)
        return True

    def _load(self, e: int, pos: int, gate: float) -> None:
        if self.slots == 0:
            return
        if len(self.items) >= self.slots:
            del self.items[self.victim(pos)]
        self.items[e] = None
        self._touched(e, pos, gate)

    def _touched(self, e: int, pos: int, gate: float) -> None:
        pass

    def victim(self, pos: int) -> int:
        return next(iter(self.items))  # least recently used


@register(EVICTION, "lru")
class LRUCache(ExpertCache):
    """Least recently used."""


@register(EVICTION, "lfu")
class LFUCache(ExpertCache):
    """Least frequently used over the whole past (evicted experts keep their count); ties: LRU."""

    def __init__(self, slots: int, **kw: object) -> None:
        super().__init__(slots)
        self.uses: dict[int, int] = {}

    def _touched(self, e: int, pos: int, gate: float) -> None:
        if gate > 0:
            self.uses[e] = self.uses.get(e, 0) + 1

    def victim(self, pos: int) -> int:
        return min(self.items, key=lambda e: self.uses.get(e, 0))  # first minimum = least recent


@register(EVICTION, "score")
class ScoreCache(ExpertCache):
    """HybriMoE-style score-aware caching: an expert's score decays by ``decay`` at every
    access of the layer and grows by the router weight it receives; the lowest is evicted."""

    def __init__(self, slots: int, decay: float = 0.9, **kw: object) -> None:
        super().__init__(slots)
        self.decay = float(decay)
        self.score: dict[int, tuple[float, int]] = {}  # expert -> (score, clock when set)
        self.clock = 0

    def _now(self, e: int) -> float:
        value, at = self.score.get(e, (0.0, self.clock))
        return value * self.decay ** (self.clock - at)

    def _touched(self, e: int, pos: int, gate: float) -> None:
        self.clock += 1
        self.score[e] = (self._now(e) + gate, self.clock)

    def victim(self, pos: int) -> int:
        return min(self.items, key=self._now)


@register(EVICTION, "static")
class StaticCache(ExpertCache):
    """The ``slots`` most frequent experts, loaded before the run and never replaced."""

    def __init__(self, slots: int, frequency: np.ndarray | None = None, **kw: object) -> None:
        super().__init__(slots)
        if frequency is not None and slots:
            top = np.argsort(-np.asarray(frequency), kind="stable")[:slots]
            for e in top:
                self.items[int(e)] = None

    def access(self, e: int, pos: int = 0, gate: float = 1.0) -> bool:
        return e in self.items

    def insert(self, e: int, pos: int = 0) -> bool:
        return False


@register(EVICTION, "belady")
class BeladyCache(ExpertCache):
    """The offline optimum: evict the expert whose next use is furthest away.

    ``future[e]`` lists the positions at which the layer uses ``e``, ascending; an expert
    never used again is evicted first, the highest id first (the workload module's keys).
    """

    def __init__(self, slots: int, future: dict[int, list[int]] | None = None, **kw: object) -> None:
        super().__init__(slots)
        self.future = future or {}

    def victim(self, pos: int) -> int:
        def next_use(e: int) -> tuple[int, int]:
            uses = self.future.get(e, ())
            i = bisect.bisect_right(uses, pos)
            return (uses[i], 0) if i < len(uses) else (1 << 62, e)
        return max(self.items, key=next_use)


def make_cache(policy: str, slots: int, **context: object) -> ExpertCache:
    """A cache of ``slots`` experts under ``policy`` (a name in :data:`EVICTION`)."""
    return _choose(EVICTION, policy, "eviction")(slots, **context)


# --------------------------------------------------------------------------- prefetch
# A prefetch policy predicts, while layer l computes, which experts layer l+1 will use:
# f(true_next, context, rng) -> expert ids, where true_next are the experts the step really
# uses at l+1 and context holds the layer's transition counts and the current experts.


@register(PREFETCH, "none")
def prefetch_none(true_next: Iterable[int], ctx: dict, rng: np.random.Generator) -> list[int]:
    """No prefetch: every miss is demand-loaded."""
    return []


@register(PREFETCH, "oracle")
def prefetch_oracle(true_next: Iterable[int], ctx: dict, rng: np.random.Generator) -> list[int]:
    """Knows the next layer's experts (an upper bound)."""
    return list(true_next)


@register(PREFETCH, "next-layer")
def prefetch_next_layer(true_next: Iterable[int], ctx: dict, rng: np.random.Generator) -> list[int]:
    """A next-layer gate (Pre-gated MoE, Fate) right with probability ``accuracy`` per expert;
    a wrong guess names an expert the step does not use."""
    acc, E = float(ctx["accuracy"]), int(ctx["num_experts"])
    true_next = list(true_next)
    out = []
    for e in true_next:
        if rng.random() < acc:
            out.append(e)
        else:
            wrong = int(rng.integers(E))
            if wrong not in true_next:
                out.append(wrong)
    return out


@register(PREFETCH, "transition")
def prefetch_transition(true_next: Iterable[int], ctx: dict, rng: np.random.Generator) -> list[int]:
    """Transition-count top-p: for each expert used now, the next-layer experts that followed
    it in the workload, most frequent first, until they cover ``top_p`` of its transitions."""
    counts = ctx["transitions"]  # [E, E] counts from this layer's experts to the next layer's
    top_p = float(ctx["top_p"])
    out: dict[int, None] = {}
    for e in ctx["current"]:
        row = counts[e]
        total = row.sum()
        if total <= 0:
            continue
        order = np.argsort(-row, kind="stable")
        cover = np.cumsum(row[order]) / total
        for j in order[: int(np.searchsorted(cover, top_p)) + 1]:
            out[int(j)] = None
    return list(out)


def prefetch_policy(name: str) -> Callable:
    return _choose(PREFETCH, name, "prefetch")


# --------------------------------------------------------------------------- miss handling
# On a cache miss of an offloaded expert: f(expert, tokens, gate, options) -> one of
# "fetch" (load over the link, run on the compute device), "local" (run where it lives),
# "low-bit" (load a low-bit copy instead and run it on the compute device).


@register(MISS, "plan")
def miss_plan(site: str, tokens: int, gate: float, costs: dict) -> str:
    """As planned: ``fetch`` sites fetch, ``hybrid`` sites run the miss where the weights live."""
    return "local" if site == "hybrid" else "fetch"


@register(MISS, "fiddler")
def miss_fiddler(site: str, tokens: int, gate: float, costs: dict) -> str:
    """Fiddler: compute on the CPU when that beats fetching for this many tokens."""
    return "local" if costs["local_s"](tokens) < costs["fetch_s"](tokens) else "fetch"


@register(MISS, "hobbit")
def miss_hobbit(site: str, tokens: int, gate: float, costs: dict) -> str:
    """HOBBIT: a low-gate expert is replaced by a low-bit copy on a miss (less to move)."""
    return "low-bit" if gate < costs["gate_threshold"] else miss_plan(site, tokens, gate, costs)


def miss_policy(name: str) -> Callable:
    return _choose(MISS, name, "miss")
