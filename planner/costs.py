"""Expected per-step costs of every per-layer option: the numbers the ILP and the baselines share.

Legend: L = MoE layers, E = routed experts per layer, P = rank grid points (the workload's
pinned grid), C = cache sizes 0..E, B = batch (tokens per decode step), b = storage format.

Experts are addressed by frequency rank within their layer (rank 0 = most frequent): experts
with equal statistics are interchangeable, so an option says how many of each kind, not which.
A per-layer **option** is a tuple ``(p, q, b_res, c, b_off, home, mode)`` with
``0 <= p <= q <= E``:

- ranks ``[0, p)`` are resident on the compute device at format ``b_res``;
- ranks ``[p, E)`` live in ``home`` (host DRAM or NVMe) at ``b_off``; of them
- ranks ``[p, q)`` (the *band*) run by ``mode`` through the layer's ``c``-slot cache:

  - ``fetch``: on a miss the weights cross the link, then run on the compute device;
  - ``hybrid``: a hit runs on the compute device, a miss runs on the CPU while the weights
    are fetched in the background for next time;
  - ``stream``: every band expert crosses the link each step, used or not (HF accelerate's
    CPU offload moves a whole module's weights per forward; ``q = E``, ``c = 0``);
  - ``local``: the band is empty (``q = p``, ``c = 0``);

- ranks ``[q, E)`` are computed by the host CPU where they live (activations cross the link
  instead of weights; only for the DRAM home).

So the execution site is chosen per expert: the frequent offloaded experts go through the
cache, the rare ones never cross the link. The split rank q runs over the rank grid, and the
best split depends on the batch: at batch B the per-expert token counts below change.

For one decode step with B tokens, expert e of layer l is active with probability
``a_e = 1 - (1 - f_e)^B`` (``f_e``: activations per token, ``sum_e f_e = K``) and then serves
``n_e = B f_e / a_e`` tokens. With ``h = h(p, q, c)``, the LRU hit rate of a ``c``-slot cache
that sees only the accesses to ranks ``[p, q)`` (the workload's band curves, exact at grid
points), and ``u_e = t_cpu(b_off, n_e)`` the CPU seconds of an expert call, an option costs
per step

    G = sum_{e<p} a_e t_dev(b_res, n_e) + sum_{p<=e<q} a_e [fetch, stream: t_dev(b_off, n_e) | hybrid: h t_dev]
    U = sum_{e>=q} a_e u_e + [hybrid: (1 - h) sum_{p<=e<q} a_e u_e] + P(CPU busy) 2 x_act(B)
    F = (1 - h) sum_{p<=e<q} a_e x(bytes(b_off))          (fetch, hybrid)
    F = (q - p) x(bytes(b_off))                           (stream)

where G is compute-device busy time, U host-CPU busy time, F link time of expert fetches,
t_dev/t_cpu come from :func:`profiles.perf.expert_call_s` and x from the route's bottleneck.
Where the compute device is the host CPU, G also holds each copy's host CPU work (the
runtime's copy worker reads the expert and makes it ready on the same cores): ``+ w(b_off)``
per copy F counts, w from :func:`profiles.perf.miss_compute_s` (0 on a GPU).
The step's hidden states cross to the CPU once and the experts' sum comes back once when the
CPU runs any expert (``P(CPU busy) = 1 - prod (1 - a_e)`` over its experts, a hybrid band
expert counting when it misses). At batch 1 a layer lasts ``E_t[max(device_t, cpu_t, link_t)]``
over the workload's per-token outcomes (resident, hit, miss, local counts:
:func:`planner.layer_schedule.expected_max`, which also gives the exact U), at B > 1 ``E_s[max(device_s, cpu_s, link_s)]``
over the workload's decode steps (:mod:`planner.step_max`; the max of the averages,
``max(G + stall, U, link)`` (:func:`planner.layer_schedule.averaged_max`), is 19% short where a CPU expert stalls one
step in three), or that max of averages where the steps are unknown. With ``Setup.dram_contention`` the max() gains host DRAM's term:
the bytes the CPU's experts read and the copies move, over the DRAM bandwidth (:mod:`planner.dram`).

Op offload (an engine with ``op_offload``, llama.cpp): in a forward pass of at least the
engine's threshold of tokens on a GPU, the ranks ``[q, E)`` that host DRAM holds are not run
by the CPU: per pass their weights cross the link (``m`` experts: all ``E - q`` for
``whole-tensor`` copies, the expected distinct ones ``sum_{e>=q} a_e`` for ``used-experts``),
then the device runs them, one after the other:

    X = x(m bytes(b_off)) + sum_{e>=q} a_e t_dev(b_off, n_e)      added to G (and the copy to F)

A prompt is the engine's micro-batches, each such a pass (:func:`planner.prefill_costs.prefill_s`). The planner's
own prefill sites (:mod:`planner.prefill_sites`) copy ranks ``[q, qk)`` of the tail (the most
used; ``qk = E``: all) while the CPU runs ``[qk, E)``: the sums above run to ``qk`` and U
keeps the rest.
Memory: ``p bytes(b_res) + c bytes(b_off)`` on the device, ``(E - p) bytes(b_off)`` at home;
besides, the device holds the dense weights, the KV cache and a workspace that no expert
decision changes (:func:`fixed_costs`): activations, and what the engine's runtime holds of
its own (its profile's ``runtime_memory``: the experts it stages while fetching, its scratch
and fixed memory; :func:`runtime_memory`).
Quality: ``sum_e w_e err_e(b_e)`` with ``w_e = f_e * mean gate weight`` and ``err_e(b)`` the
expert's measured error (``Setup.expert_error``, from ``planner quality measure``) or else the
format's constant (``QUANT_ERROR``); prefix sums in rank order keep the rank structure.

Per-expert formats (:mod:`planner.format_tiers`): an option may carry a tier ``(k, b_up)``,
the ``k`` tail experts (ranks ``>= q``, run where they live) of greatest error gain stored at
``b_up`` instead of ``b_off``. Their calls add ``sum_{e in tier} a_e (u_e(b_up) - u_e(b_off))``
to U (at batch 1 each token's tier experts are counted apart, ``n_up`` of its ``n_local``),
their bytes and errors replace ``b_off``'s; the band, the cache and every site stay as they are.
"""

from __future__ import annotations

import numpy as np

from profiles.miss_copy import with_copies
from profiles.perf import op_offloads

from .dram import averaged_dram_s, dram_prices, outcome_dram_s
from .format_tiers import tier_masks, tier_rows
from .layer_schedule import averaged_max, expected_max
from .miss_copy_options import COPY_MODE, copy_costs
from .nested_options import NESTED_MODE, nested_costs
from .options import _keeps_critical, engine_runs, keeps_critical, option_specs
from .setup import DEFAULT_FORMATS, MODES, N_SPEC, QUANT_ERROR, SPEC_COLUMNS, OptionTable, Setup
from .step_costs import FixedCosts, capacity, fixed_costs, option_time, runtime_memory, step_time
from .step_max import stepped_max

# planner.costs is the one cost path planner, baselines, simulator-facing reports and
# exporters import: the problem's inputs (planner.setup), its options (planner.options) and
# whole-step costs (planner.step_costs) are named here beside the option prices; a prompt's
# prefill is priced from these in planner.prefill_costs
__all__ = ["DEFAULT_FORMATS", "MODES", "N_SPEC", "QUANT_ERROR", "SPEC_COLUMNS", "FixedCosts", "OptionTable", "Setup",
           "capacity", "engine_runs", "fixed_costs", "keeps_critical", "layer_options", "option_costs", "option_specs",
           "option_time", "runtime_memory", "step_time", "with_tiers"]


def option_costs(s: Setup, layer: int, specs: np.ndarray, tiers: np.ndarray | None = None,
                 fetch_s: np.ndarray | None = None, copy_calls: tuple[str, np.ndarray] | None = None) -> OptionTable:
    """Costs of the options ``specs`` (``[N, 7]``, SPEC_COLUMNS) of ``layer``, each with its
    tier ``tiers[i] = (k, b_up)`` (``[N, 2]``, :mod:`planner.format_tiers`; None: no tiers):
    see the module docstring. ``fetch_s``: ``[N]`` seconds of one fetch per row instead of the
    route's for ``b_off``; ``copy_calls``: ``(format, [E] share by rank)``: that share of each
    cache-served band expert's calls runs at ``format``'s cached-expert kernel instead of
    ``b_off``'s (a copy option's fetch and calls, planner.miss_copy_options)."""
    specs = np.asarray(specs, dtype=np.int64).reshape(-1, N_SPEC)
    nested, copies = specs[:, 6] == NESTED_MODE, specs[:, 6] == COPY_MODE
    if nested.any() or copies.any():  # nested and copy options price apart, rows kept in order
        plain = ~(nested | copies)
        parts = [(rows, nested_costs(s, layer, specs[rows]) if kind == "nested" else
                  copy_costs(s, layer, specs[rows]) if kind == "copy" else
                  option_costs(s, layer, specs[rows], None if tiers is None else np.asarray(tiers).reshape(-1, 2)[rows]))
                 for kind, rows in (("nested", np.flatnonzero(nested)), ("copy", np.flatnonzero(copies)),
                                    ("plain", np.flatnonzero(plain))) if len(rows)]
        order = np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable")
        return OptionTable(**{k: np.concatenate([getattr(t, k) for _, t in parts])[order]
                              for k in OptionTable.__dataclass_fields__})
    st = s.stats
    E, B = st.num_experts, s.batch_size
    p, q, bi, c, bo, hi, mode = specs.T  # [N] each
    tiers = np.zeros((len(specs), 2), np.int64) if tiers is None else np.asarray(tiers, np.int64).reshape(-1, 2)
    k_up = tiers[:, 0]  # [N]
    bu = np.where(k_up > 0, tiers[:, 1], bo)  # [N]
    up = tier_masks(s, layer, q, k_up, bo, bu)  # [N, E] by rank: each option's tier
    f = st.frequency[layer][st.order[layer]]  # [E] by descending frequency
    w = st.importance[layer][st.order[layer]]  # [E]
    act = 1.0 - (1.0 - np.clip(f, 0.0, 1.0)) ** B  # [E] P(active in a step)
    tokens = np.where(act > 0, B * f / np.maximum(act, 1e-300), 1.0)  # [E] tokens per call

    def cum(v: np.ndarray) -> np.ndarray:  # [E+1] prefix sums over experts by rank
        return np.concatenate([[0.0], np.cumsum(v)])

    act_c = cum(act)  # [E+1]
    # call seconds only for the formats the options use (one for a given placement's row)
    used = set(np.concatenate([bi, bo, bu]).tolist())
    unused = np.zeros(E + 1)  # never indexed
    dev_c = np.stack([cum(act * s.call_s(s.compute, fm, tokens)) if j in used else unused
                      for j, fm in enumerate(s.formats)])  # [b, E+1]
    # band experts served from the engine's expert cache (fetch, hybrid) at the cached experts'
    # price (profiles.perf.efficiency_of: the bundle on a CPU runs them on one thread each)
    cached_c = np.stack([cum(act * s.call_s(s.compute, fm, tokens, cached=True)) if j in used else unused
                         for j, fm in enumerate(s.formats)]) if s.compute.cached_efficiency is not None else dev_c
    cpu_e = np.stack([act * s.call_s(s.host, fm, tokens) if j in used else unused[1:]
                      for j, fm in enumerate(s.formats)])  # [b, E] a_e u_e by rank
    cpu_c = np.stack([cum(v) for v in cpu_e])  # [b, E+1] sum a_e u_e
    err_e = np.stack([w * s.errors_of(layer, fm)[st.order[layer]] for fm in s.formats])  # [b, E]
    # a tier's experts (tail ranks in `up`) take b_up's CPU seconds and error instead of b_off's
    tiered = np.flatnonzero(k_up > 0)
    up_U, up_err = np.zeros(len(specs)), np.zeros(len(specs))  # [N]
    up_U[tiered] = ((cpu_e[bu[tiered]] - cpu_e[bo[tiered]]) * up[tiered]).sum(axis=1)
    up_err[tiered] = ((err_e[bu[tiered]] - err_e[bo[tiered]]) * up[tiered]).sum(axis=1)
    idle_c = cum(np.log1p(-np.minimum(act, 1.0 - 1e-12)))  # [E+1] log P(none of the first ranks active)
    err_c = np.stack([cum(v) for v in err_e])  # [b, E+1]
    eb = np.array([s.expert_bytes(fm) for fm in s.formats])  # [b]
    xfer = np.array([[s.transfer_s(home, eb[j]) for j in range(len(eb))] for home in s.homes]
                    or [[0.0] * len(eb)])  # [homes, b]

    dram_homes = np.array([s.in_host_dram(h) for h in range(len(s.homes))] or [False])
    in_dram = dram_homes[np.minimum(hi, len(dram_homes) - 1)]  # [N]
    # op offload: the DRAM-held tail runs on the device after a copy, not on the CPU
    offload = in_dram & (q < E) if _offloading(s) else np.zeros(len(specs), bool)  # [N]
    # of an offloading tail the ranks [q, qk) are copied (the planner's prefill sites may copy
    # only the most used, planner.prefill_sites), the CPU runs [qk, E) meanwhile; qk = q: no copy
    copied = s.prefill_copied if s.prefill_offload and s.prefill_copied is not None else E
    qk = np.where(offload, np.minimum(q + copied, E), q)  # [N]
    res_G = dev_c[bi, p]
    via_cache = (mode == MODES.index("fetch")) | (mode == MODES.index("hybrid"))  # [N]
    if copy_calls is not None:  # band calls a copy serves run the copy's kernel (profiles.miss_copy.with_copies)
        c_fmt, c_share = copy_calls
        t_copy = s.call_s(s.compute, c_fmt, tokens, cached=True)  # [E]
        cached_c = np.stack([cum(act * with_copies(s.call_s(s.compute, fm, tokens, cached=True), t_copy, c_share))
                             if j in used else unused for j, fm in enumerate(s.formats)])  # [b, E+1]
    band_G = np.where(via_cache, cached_c[bo, q] - cached_c[bo, p], dev_c[bo, q] - dev_c[bo, p])
    band_U = cpu_c[bo, q] - cpu_c[bo, p]
    tail_U = cpu_c[bo, E] - cpu_c[bo, qk] + np.where(offload, 0.0, up_U)
    tail_idle = idle_c[E] - idle_c[qk]
    x = xfer[np.minimum(hi, len(xfer) - 1), bo] if fetch_s is None else np.asarray(fetch_s, float)  # [N] per fetch
    keys = {(int(a), int(b), int(d)) for a, b, d in zip(p, c, q)}
    h_of = {k: (st.hit_rate(layer, k[0], k[1], k[2]) if k[2] > k[0] else 0.0) for k in keys}
    h = np.array([h_of[(int(a), int(b), int(d))] for a, b, d in zip(p, c, q)])  # [N] h(p, q, c)
    miss = (act_c[q] - act_c[p]) * (1 - h)  # [N] expected fetches per step
    is_ = {m: mode == MODES.index(m) for m in MODES}
    G = res_G + np.where(is_["hybrid"], h, np.where(is_["local"], 0.0, 1.0)) * band_G
    # each copy's host CPU work (read, made ready) comes out of a CPU compute device's cores
    w_miss = np.array([s.miss_compute_s(fm) for fm in s.formats])[bo]  # [N] seconds per copy
    G = G + w_miss * np.where(is_["stream"], q - p, np.where(is_["fetch"] | is_["hybrid"], miss, 0.0))
    # the step's hidden states go to the CPU once and the experts' sum comes back once, when
    # the CPU runs anything: P(any) from the experts' activity (independently, a hybrid band
    # expert counting when it misses)
    band_idle = np.where(is_["local"], idle_c[q] - idle_c[p], np.where(is_["hybrid"], (1 - h) * (idle_c[q] - idle_c[p]),
                                                                          0.0))
    p_cpu = 1.0 - np.exp(tail_idle + band_idle)
    U = (tail_U + np.where(is_["hybrid"], 1 - h, np.where(is_["local"], 1.0, 0.0)) * band_U
         + p_cpu * 2 * s.activation_s(B))
    F = np.where(is_["stream"], (q - p) * x, np.where(is_["fetch"] | is_["hybrid"], miss * x, 0.0))
    if offload.any():
        copy_s = _offload_copy_s(s, offload, q, qk, bo, hi, act_c, eb)  # [N]
        G = G + copy_s + dev_c[bo, qk] - dev_c[bo, q]  # the device waits for the copy
        F = F + copy_s
    error = err_c[bi, p] + err_c[bo, E] - err_c[bo, p] + up_err
    # what each placement holds: an expert a CPU runs from memory is held as its session's
    # pre-packed copy (kernel_factor); a hybrid expert in host DRAM as that and the copy the
    # device fetches from; an expert on a drive as its stored bytes
    f_dev = np.array([s.kernel_factor(s.compute, fm) for fm in s.formats])  # [b]
    f_cpu = np.array([s.kernel_factor(s.host, fm) for fm in s.formats])  # [b]
    run_f = np.where(in_dram, f_cpu[bo], 1.0)  # [N]
    band_f = np.where(is_["local"], run_f, np.where(is_["hybrid"] & in_dram, 1.0 + f_cpu[bo], 1.0))
    dev_bytes = p * eb[bi] * f_dev[bi] + c * eb[bo] * f_dev[bo]
    home_bytes = eb[bo] * ((q - p) * band_f + (E - q) * run_f)
    # a tier's experts are tail experts (run where they live) held at b_up instead
    home_bytes = home_bytes + k_up * (eb[bu] * np.where(in_dram, f_cpu[bu], 1.0) - eb[bo] * run_f)
    if s.dropped and s.dropped[layer]:  # planner.task: never called (the stats), so the last ranks
        kept = E - len(s.dropped[layer])  # the dropped ranks [kept, E): held nowhere, their importance lost
        dev_bytes = dev_bytes - np.maximum(p - kept, 0) * eb[bi] * f_dev[bi]
        home_bytes = home_bytes - eb[bo] * (np.maximum(q - np.maximum(p, kept), 0) * band_f
                                            + (E - np.maximum(q, kept)) * run_f)
        error = error + s.dropped_importance[layer]

    r = float(st.predictability[layer])
    if B == 1 and st.access_rank is not None and not offload.any():
        t_dev1 = np.array([s.call_s(s.compute, fm, np.ones(1))[0] for fm in s.formats])  # [b] one-token calls
        t_hit1 = np.array([s.call_s(s.compute, fm, np.ones(1), cached=True)[0] for fm in s.formats])  # [b] cached
        t_hit1 = t_hit1[bo]  # [N] a band call served from the cache
        if copy_calls is not None:  # a share S of the band's calls runs the copy (its activity-weighted share)
            c_fmt, c_share = copy_calls
            band_a = act_c[q] - act_c[p]
            share = (cum(act * c_share)[q] - cum(act * c_share)[p]) / np.maximum(band_a, 1e-300)
            t_hit1 = with_copies(t_hit1, s.call_s(s.compute, c_fmt, np.ones(1), cached=True)[0], share)
        t_cpu1 = np.array([s.call_s(s.host, fm, np.ones(1))[0] for fm in s.formats])
        # every option against every per-token outcome of its (p, c, q): ragged pairs
        if len(tiered):  # a token's tier experts counted apart (n_up of its n_local)
            # one id per distinct set of tier experts (rows packed to 64-bit words: a fast unique)
            packed = np.packbits(up, axis=1)
            packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8))).view(np.uint64)  # [N, ceil(E / 64)]
            _, first_of, set_of = np.unique(packed, axis=0, return_index=True, return_inverse=True)
            sets = up[first_of]  # [S, E]
            keys, key_of = np.unique(np.stack([p, c, q, set_of.ravel()], axis=1), axis=0, return_inverse=True)
            key, *outcome, n_up = st.outcome_table(layer, keys[:, :3], up=sets[keys[:, 3]])
        else:
            keys, key_of = np.unique(np.stack([p, c, q], axis=1), axis=0, return_inverse=True)
            key, *outcome = st.outcome_table(layer, keys)  # [M] grouped by key
            n_up = None
        key_of = key_of.ravel()
        first = np.searchsorted(key, np.arange(len(keys)))  # [keys] first outcome of each key
        per_opt = np.diff(np.append(first, len(key)))[key_of]  # [N] outcomes per option
        opt = np.repeat(np.arange(len(specs)), per_opt)  # [pairs] the option of each pair
        row = first[key_of][opt] + np.arange(len(opt)) - np.repeat(np.cumsum(per_opt) - per_opt, per_opt)
        n_res, n_hit, n_miss, n_local, share = (v[row] for v in outcome)
        tier = {} if n_up is None else dict(n_up=n_up[row], t_up=t_cpu1[bu[opt]])
        *times, cpu = expected_max(n_res, n_hit, n_miss, n_local, mode[opt], t_dev1[bi[opt]],
                                    np.where(via_cache[opt], t_hit1[opt], t_dev1[bo[opt]]),
                                    t_cpu1[bo[opt]], x[opt], (q - p)[opt], r, 2 * s.activation_s(1.0), **tier,
                                    w_miss=w_miss[opt])
        if s.dram_contention:  # host DRAM shared by the token's CPU reads and copies (planner.dram)
            times = [np.maximum(t, d) for t, d in zip(times, outcome_dram_s(
                dram_prices(s), n_res, n_hit, n_miss, n_local, mode[opt], bi[opt], bo[opt], hi[opt], (q - p)[opt], r,
                None if n_up is None else tier["n_up"], bu[opt]))]
        tau, tau_pf, U = (np.bincount(opt, weights=share * t, minlength=len(specs)) for t in (*times, cpu))
    else:
        tau, tau_pf = (averaged_max(G, U, F, mode, r, pf) for pf in (False, True))
        if B > 1 and st.step_active is not None and not offload.all():  # per step (planner.step_max)
            def per_rank(dev, **kw) -> np.ndarray:  # [b, E] one call's seconds by format and rank
                return np.stack([s.call_s(dev, fm, tokens, **kw) if j in used else unused[1:]
                                 for j, fm in enumerate(s.formats)])
            t_dev, t_cpu = per_rank(s.compute), per_rank(s.host)
            t_cached = per_rank(s.compute, cached=True) if s.compute.cached_efficiency is not None else t_dev
            if copy_calls is not None:
                t_cached = with_copies(t_cached, t_copy[None, :], copy_calls[1][None, :])
            k = ~offload
            tier_cpu = (up * (t_cpu[bu] - t_cpu[bo]))[k] if len(tiered) else None
            port = None
            if s.dram_contention:  # the port's seconds per step join the max (planner.dram's bytes)
                dp = dram_prices(s)
                port = (dp.cpu_read, dp.dev_read, dp.copy[np.minimum(hi, len(dp.copy) - 1), bo][k], dp.port_bytes_per_s,
                        (up * (dp.cpu_read[bu] - dp.cpu_read[bo])[:, None])[k] if len(tiered) else None)
            tau[k], tau_pf[k] = stepped_max(st.step_active[:, layer], p[k], q[k], qk[k], bi[k], bo[k], mode[k], h[k],
                                            x[k], w_miss[k], r, 2 * s.activation_s(B), t_dev, t_cached, t_cpu,
                                            tier_cpu, port)
        if s.dram_contention:  # the rows priced from averages (all, where the steps are unknown)
            dram = averaged_dram_s(s, dram_prices(s), p, q, bi, bo, bu, hi, mode, act, act_c, up, h, miss, offload, r)
            averaged = offload if B > 1 and st.step_active is not None else np.ones(len(specs), bool)
            tau = np.where(averaged, np.maximum(tau, dram[0]), tau)
            tau_pf = np.where(averaged, np.maximum(tau_pf, dram[1]), tau_pf)
    return OptionTable(p=p.copy(), q=q.copy(), b_res=bi.copy(), c=c.copy(), b_off=bo.copy(), home=hi.copy(),
                       mode=mode.copy(), G=G, U=U, F=F, dev_bytes=dev_bytes, home_bytes=home_bytes, error=error,
                       tau=tau, tau_prefetch=tau_pf, k=k_up.copy(), b_up=bu.copy())


def _offloading(s: Setup) -> bool:
    """Whether a step of ``s.batch_size`` tokens runs the host-held experts on the compute
    device after copying them (the engine's op offload, :func:`profiles.perf.op_offloads`)."""
    if s.prefill_offload:  # the planner's prefill site (planner.prefill_sites): the tail copied, then run here
        return not s.unified and s.compute.kind == "gpu"
    op_offload = s.engine.op_offload if s.engine is not None else None
    return not s.unified and op_offloads(op_offload, s.compute, s.batch_size)


def _offload_copy_s(s: Setup, offload: np.ndarray, q: np.ndarray, qk: np.ndarray, bo: np.ndarray,
                    hi: np.ndarray, act_c: np.ndarray, eb: np.ndarray) -> np.ndarray:
    """``[N]`` link seconds of one pass's op-offload copy of each ``offload`` row's copied
    tail ``[q, qk)``: every one of its experts (``whole-tensor``) or the expected distinct ones
    the pass uses (``used-experts``, ``sum a_e``), as one transfer over the route from its home."""
    whole = not s.prefill_offload and s.engine.op_offload.copies == "whole-tensor"
    moved = np.where(offload, (qk - q) if whole else act_c[qk] - act_c[q], 0.0) * eb[bo]  # [N] bytes
    out = np.zeros(len(q))
    for h, home in enumerate(s.homes):
        route = s.hardware.route(home, s.compute.id)
        rows = offload & (hi == h) & (moved > 0)
        if route.links and rows.any():
            out[rows] = moved[rows] / route.bottleneck_bytes_per_s + route.latency_s  # Route.transfer_s
    return out


def layer_options(s: Setup, layer: int, extra: np.ndarray | None = None) -> OptionTable:
    """The option grid of ``layer`` plus any ``extra`` specs (baselines), with their costs."""
    specs = option_specs(s, layer)
    if extra is not None and len(extra):
        extra = np.asarray(extra, dtype=np.int64).reshape(-1, N_SPEC)
        if s.fixes is not None:
            extra = extra[s.fixes.allows(s, layer, extra)]  # a baseline's row that breaks a fix
        extra = extra[_keeps_critical(s, layer, extra)]  # ... or quantises a critical expert
        specs = np.unique(np.concatenate([specs, extra]), axis=0)
    return option_costs(s, layer, specs)


def with_tiers(s: Setup, layer: int, table: OptionTable, rows: np.ndarray) -> OptionTable:
    """``table`` and, appended, its options ``rows`` with every tier :func:`planner.format_tiers.tier_rows`
    offers them (per-expert formats); none with op offload, whose copies of the tail this
    module prices at one format."""
    specs = table.specs(np.asarray(rows, np.int64))
    tier_of, tiers = tier_rows(s, layer, specs) if not _offloading(s) else (np.zeros(0, np.int64), None)
    if not len(tier_of):
        return table
    more = option_costs(s, layer, specs[tier_of], tiers)
    return OptionTable(**{k: np.concatenate([getattr(table, k), getattr(more, k)]) for k in table.__dataclass_fields__})
