"""Plots of a run: loss per round, overall and per category, from the server's test set and/or the
clients' federated validation (with the spread over clients)."""

from __future__ import annotations

from pathlib import Path


def _category_lines(ax, curve: list[tuple[int, dict]], colors: dict) -> None:
    rounds = [r for r, _ in curve]
    for cat, color in colors.items():
        ax.plot(rounds, [e.get("by_category", {}).get(cat, float("nan")) for _, e in curve], lw=1, alpha=0.75,
                color=color, label=cat.replace("_", " "))
    ax.plot(rounds, [e["loss"] for _, e in curve], lw=2.5, color="black", marker="o", ms=4, label="overall")


def plot_loss(curve: list[tuple[int, dict]], path: str | Path, title: str = "held-out loss of the global adapter",
              validation: list[tuple[int, dict]] | None = None) -> None:
    """``curve``: (round, test figures); ``validation``: (round, federated validation figures). One panel per
    source that has points; the validation panel shades the clients' min-max and draws the worst tenth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(f"test: {title}", curve, False)] if curve else []
    if validation:
        k = max(e["clients"] for _, e in validation)
        panels.append((f"validation (federated, {k} clients)", validation, True))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(8 if len(panels) == 1 else 13, 4.8), squeeze=False,
                             sharey=len(panels) > 1)
    # one colour per category in every panel (a category only some clients hold is absent from validation)
    cats = sorted({c for _, points, _ in panels for _, e in points for c in e.get("by_category", {})})
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    colors = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
    for ax, (name, points, spread) in zip(axes[0], panels):
        _category_lines(ax, points, colors)
        if spread:
            rounds = [r for r, _ in points]
            ax.fill_between(rounds, [e["spread"]["min"] for _, e in points], [e["spread"]["max"] for _, e in points],
                            color="grey", alpha=0.15, label="clients: min to max")
            ax.plot(rounds, [e["spread"]["worst_tenth"] for _, e in points], lw=1.5, ls="--", color="dimgrey",
                    label="clients: worst tenth")
        ax.set_xlabel("round (0 = base model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers: no 2.5 on the axis
        ax.set_ylabel("loss per response token")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
