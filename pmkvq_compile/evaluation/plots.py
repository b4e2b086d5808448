"""PNG plots of an evaluation's results (matplotlib, Agg backend): memory, PM-KVQ body bits, KL vs position."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_all", "plot_body_bits", "plot_kl", "plot_memory"]

_STYLE = {
    "rtn": ("tab:red", ":"),
    "kivi": ("tab:orange", "-."),
    "pmkvq-uniform": ("tab:blue", "-"),
    "pmkvq-calibrated": ("tab:green", "--"),
    "pmkvq-f16s": ("tab:purple", "-"),
    "unquantized": ("black", "-"),
}


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "plots need matplotlib; install it with `pip install -e .[eval]` (or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _budgets(results: dict[str, Any]) -> list[int]:
    return list(results["config"]["budgets"])


def _methods_at(results: dict[str, Any], bits: int) -> list[dict[str, Any]]:
    return [m for m in results["methods"] if m["bits"] == bits]


def plot_memory(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """KV MiB held vs tokens in the cache, one panel per budget, with the budget line."""
    plt = _plt()
    budgets = _budgets(results)
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.2 * len(budgets), 4.3), squeeze=False)
    ref = next(m for m in results["methods"] if m["kind"] == "unquantized")
    for ax, b in zip(axes[0], budgets):
        ms = _methods_at(results, b)
        budget = ms[0]["budget_bytes"] / 2**20
        top = 1.25 * budget
        for m in ms:
            c, ls = _STYLE[m["kind"]]
            ax.plot(
                m["memory"]["tokens"],
                np.array(m["memory"]["nbytes"]) / 2**20,
                color=c,
                ls=ls,
                lw=1.8,
                label=m["name"],
            )
        rt, rb = np.array(ref["memory"]["tokens"]), np.array(ref["memory"]["nbytes"]) / 2**20
        ax.plot(rt, rb, color="black", lw=1.2, label=f"unquantized fp32 (reaches {rb[-1]:.1f} MiB)")
        ax.axhline(budget, color="gray", lw=1.2, ls="-.", label=f"budget {budget:.3f} MiB")
        ax.axvline(results["max_len"], color="gray", lw=0.8, ls=":")
        ax.set_ylim(0, top)
        ax.set_xlim(0, results["max_len"] * 1.02)
        ax.set_title(f"{b}-bit budget at max_len={results['max_len']} tokens")
        ax.set_xlabel("tokens in the KV cache (prompt + generated)")
        ax.set_ylabel("KV cache MiB (codes + scales + zeros), all layers")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(f"KV memory per method, {results['model']}, first trace", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plot_body_bits(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Heatmaps of each PM-KVQ method's body bit-width (max of K and V) per layer vs tokens."""
    plt = _plt()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    ms = [m for m in results["methods"] if m["kind"].startswith("pmkvq") and m["body_bits"]]
    if not ms:
        raise ValueError("no PM-KVQ method in the results: nothing to plot for the body bits")
    fig, axes = plt.subplots(len(ms), 1, figsize=(10, 1.1 + 1.9 * len(ms)), squeeze=False, sharex=True)
    cmap = ListedColormap(["#d73027", "#fc8d59", "#91bfdb", "#4575b4"])
    norm = BoundaryNorm([1, 3, 6, 12, 20], cmap.N)
    img = None
    for ax, m in zip(axes[:, 0], ms):
        bits = np.array(m["body_bits"]).T  # [layers, chunks]
        tokens = np.array(m["memory"]["tokens"])
        edges = np.concatenate([[0], tokens])
        img = ax.pcolormesh(edges, np.arange(bits.shape[0] + 1), bits, cmap=cmap, norm=norm, shading="flat")
        ax.set_ylabel("layer")
        ax.set_title(m["name"], fontsize=9)
    axes[-1, 0].set_xlabel("tokens in the KV cache")
    cb = fig.colorbar(img, ax=axes[:, 0].tolist(), ticks=[2, 4, 8, 16], fraction=0.03, pad=0.02)
    cb.set_label("body bits")
    fig.suptitle("PM-KVQ body bit-width per layer over time (first trace)", fontsize=10)
    p = Path(path)
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return p


def plot_kl(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Mean KL(unquantized || method) per chunk of positions (pooled over traces), one panel per budget."""
    plt = _plt()
    budgets = _budgets(results)
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.2 * len(budgets), 4.3), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets):
        for m in _methods_at(results, b):
            c, ls = _STYLE[m["kind"]]
            x, y = np.array(m["kl_curve"]["start"]), np.array(m["kl_curve"]["kl_mean"])
            if y.size > 4:  # light smoothing over 4 chunks keeps the trend readable
                y = np.convolve(y, np.ones(4) / 4, mode="same")
            ax.plot(x, np.maximum(y, 1e-6), color=c, ls=ls, lw=1.6, label=m["name"])
        ax.set_yscale("log")
        ax.set_title(f"{b}-bit budget")
        ax.set_xlabel("generated-token position")
        ax.set_ylabel("mean KL from unquantized (nats), 4-chunk moving mean")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Next-token KL vs position, teacher-forced, {len(results['traces'])} traces", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plot_all(results: dict[str, Any], out_dir: str | os.PathLike[str], *, prefix: str = "eval") -> list[Path]:
    """Write ``<prefix>_memory.png``, ``<prefix>_body_bits.png`` (when PM-KVQ ran), ``<prefix>_kl.png``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = [plot_memory(results, d / f"{prefix}_memory.png")]
    if any(m["kind"].startswith("pmkvq") for m in results["methods"]):
        paths.append(plot_body_bits(results, d / f"{prefix}_body_bits.png"))
    paths.append(plot_kl(results, d / f"{prefix}_kl.png"))
    return paths
