"""Plots of a run: held-out loss per round, overall and per category."""

from __future__ import annotations

from pathlib import Path


def plot_loss(curve: list[tuple[int, dict]], path: str | Path, title: str = "held-out loss of the global adapter") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not curve:
        return
    rounds = [r for r, _ in curve]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    cats = sorted({c for _, e in curve for c in e.get("by_category", {})})
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    for i, cat in enumerate(cats):
        ax.plot(rounds, [e["by_category"].get(cat, float("nan")) for _, e in curve], lw=1, alpha=0.75,
                color=cmap(i % cmap.N), label=cat.replace("_", " "))
    ax.plot(rounds, [e["loss"] for _, e in curve], lw=2.5, color="black", marker="o", ms=4, label="overall")
    ax.set_xlabel("round (0 = base model)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers: no 2.5 on the axis
    ax.set_ylabel("loss per response token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
