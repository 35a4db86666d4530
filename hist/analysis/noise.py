"""The gradient noise scale B_simple from a run's probes, and what it says about process counts.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training", Appendix A): from the
squared gradient norms at a small batch b and a big batch B (`engine.noise` measures both),
    |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b),   tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B),
and B_simple = tr(Sigma) / |G|^2. Each probe's estimate is noisy, so numerator and denominator are
averaged over probes before the ratio, as the paper recommends. Steps to a given loss follow
S_min (1 + B_noise / batch): a global batch well below B_simple is paid for in full by fewer
steps, one above it buys little.
"""

from __future__ import annotations

import numpy as np


def probe_estimates(noise: dict) -> tuple[np.ndarray, np.ndarray]:
    """(|G|^2, tr(Sigma)) per probe, unbiased but noisy (either can come out negative)."""
    b, big = noise["small_batch"].astype(float), noise["big_batch"].astype(float)
    small_sq, big_sq = noise["small_sq"], noise["big_sq"]
    grad_sq = (big * big_sq - b * small_sq) / (big - b)
    trace = (small_sq - big_sq) / (1.0 / b - 1.0 / big)
    return grad_sq, trace


def noise_scale(noise: dict, since_epoch: float = 0.0) -> float | None:
    """B_simple over the probes from `since_epoch` on (None without probes or with |G|^2 <= 0)."""
    if not noise or not len(noise["round"]):
        return None
    keep = noise["epoch"] >= since_epoch
    grad_sq, trace = probe_estimates({k: v[keep] for k, v in noise.items()})
    if not len(grad_sq) or grad_sq.mean() <= 0:
        return None
    return float(trace.mean() / grad_sq.mean())


def step_speedup(b_noise: float, batch: int, processes) -> np.ndarray:
    """Fewer steps to the same loss at `processes` x `batch` than at `batch` alone (at most N)."""
    n = np.asarray(processes, dtype=float)
    return (1 + b_noise / batch) / (1 + b_noise / (n * batch))


def processes_that_pay(b_noise: float, batch: int) -> int:
    """The largest power of two N whose global batch N x batch is at most B_noise, the critical
    batch: there training takes twice the fewest steps and twice the fewest images, so beyond it
    most of each added process's images are wasted (1 when even one process is above it)."""
    n = 1
    while 2 * n * batch <= b_noise:
        n *= 2
    return n


def summary(run, batch: int) -> dict | None:
    """What one run's probes say: B_simple over the run and over its second half, and the counts."""
    noise = run.noise
    whole = noise_scale(noise)
    if whole is None:
        return None
    epochs = float(noise["epoch"].max())
    late = noise_scale(noise, since_epoch=epochs / 2)
    decide = late if late is not None else whole
    return {
        "probes": int(len(noise["round"])),
        "b_simple": whole,
        "b_simple_late": late,
        "batch": batch,
        "processes_that_pay": processes_that_pay(decide, batch),
    }


def format_summary(name: str, s: dict) -> str:
    late = "n/a" if s["b_simple_late"] is None else f"{s['b_simple_late']:,.0f}"
    n = s["processes_that_pay"]
    more = step_speedup(s["b_simple_late"] or s["b_simple"], s["batch"], [n, 2 * n])
    return (
        f"gradient noise scale, {name}: B_simple {s['b_simple']:,.0f} images over {s['probes']} probes "
        f"({late} in the second half). At {s['batch']} images a process, data parallelism pays up to "
        f"about {n} process{'es' if n > 1 else ''} (global batch {n * s['batch']:,}, at most B_simple); "
        f"going from {n} to {2 * n} would cut the steps by {more[1] / more[0]:.2f}x, not 2x "
        f"(McCandlish et al. 2018)"
    )
