"""Reports: markdown tables of evaluation results (the paper's Table 2 and Table 3) and a bar chart."""

from __future__ import annotations

import math
from pathlib import Path

METRICS = {  # key -> (title, higher is better)
    "loss": ("held-out loss", False),
    "perplexity": ("perplexity", False),
    "rouge_l": ("ROUGE-L", True),
}


def metric(result: dict, key: str, category: str | None = None) -> float:
    """A metric of one evaluation result, overall or for one category (NaN if absent)."""
    if key == "rouge_l":
        r = result.get("rouge_l")
        if not r:
            return math.nan
        return r["mean"] if category is None else r["by_category"].get(category, math.nan)
    loss = result.get("loss")
    if not loss:
        return math.nan
    if key == "loss":
        return loss["loss"] if category is None else loss["by_category"].get(category, math.nan)
    if key == "perplexity":
        return loss["perplexity"] if category is None else loss["perplexity_by_category"].get(category, math.nan)
    raise KeyError(key)


def fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def cell(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def table(header: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    """A markdown table; columns after the first are right-aligned when ``numeric``."""
    align = ["---"] + ["---:" if numeric else "---"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def categories(results: list[dict]) -> list[str]:
    return sorted({a["category"] for r in results for a in r.get("answers", [])})


def eval_markdown(results: list[dict], title: str = "Evaluation") -> str:
    """`fedit eval`: per-category loss, perplexity and ROUGE-L of one or more models."""
    out = [f"# {title}", ""]
    first = results[0]
    s = first["settings"]
    out.append(f"{first['questions']} questions from `{first['source']}`; template {s['template']}, cutoff "
               f"{s['cutoff_len']} tokens, {'sampled' if s['do_sample'] else 'greedy'} answers of at most "
               f"{s['max_new_tokens']} new tokens.")
    out.append("")
    for r in results:
        if "loss" not in r:
            out.append(f"{r['name']}: {len(r['answers'])} answers generated (no references: no loss or ROUGE-L).")
            continue
        out += [f"## {r['name']}", ""]
        rows = []
        for cat in categories([r]) + [None]:
            n = sum(1 for a in r["answers"] if cat is None or a["category"] == cat)
            rows.append(["**overall**" if cat is None else cat, str(n), fmt(metric(r, "loss", cat)),
                         fmt(metric(r, "perplexity", cat), 2), fmt(metric(r, "rouge_l", cat))])
        out += [table(["category", "questions", "loss ↓", "perplexity ↓", "ROUGE-L ↑"], rows), ""]
    return "\n".join(out)


def comparison_tables(results: dict[str, dict], candidate: str, baselines: list[str]) -> str:
    """Table 2 style: per metric, each baseline's value, the candidate's, and candidate / baseline;
    then the same per category."""
    cand = results[candidate]
    cats = categories(list(results.values()))
    out = []
    for key, (title, higher) in METRICS.items():
        if math.isnan(metric(cand, key)):
            continue
        better = "higher is better: relative > 1 favours " if higher else "lower is better: relative < 1 favours "
        out += [f"### {title} ({better}{candidate})", ""]
        rows = [[b, fmt(metric(results[b], key)), fmt(metric(cand, key)), fmt(ratio(metric(cand, key), metric(results[b], key)), 3)]
                for b in baselines]
        out += [table(["baseline", "baseline", candidate, f"relative ({candidate} / baseline)"], rows), ""]
        out += [f"Per category ({title}; each cell: value, and {candidate} / that model):", ""]
        rows = []
        for cat in cats:
            row = [cat]
            for b in baselines:
                v = metric(results[b], key, cat)
                row.append(f"{fmt(v)} ({fmt(ratio(metric(cand, key, cat), v), 2)})")
            row.append(fmt(metric(cand, key, cat)))
            rows.append(row)
        out += [table(["category"] + baselines + [candidate], rows), ""]
    return "\n".join(out)


def judge_tables(judgements: dict[str, dict], candidate: str) -> str:
    """Judge scores per baseline: totals, relative score, and what the judge did (nothing hidden)."""
    if not judgements:
        return ""
    any_j = next(iter(judgements.values()))
    out = [f"### LLM judge ({any_j['judge']}; {any_j['samples']} samples per order, both orders; "
           f"relative = {candidate} total / baseline total)", ""]
    rows = []
    for b, j in judgements.items():
        c = j["calls"]
        rows.append([b, fmt(j["baseline_total"], 2), fmt(j["candidate_total"], 2), fmt(j["relative"], 3),
                     f"{j['scored_questions']}/{j['questions']}", str(c["planned"]), str(c["parsed"]),
                     str(c["unparseable"]), str(c["failed"]), str(c["retries"])])
    out += [table(["baseline", "baseline total", f"{candidate} total", "relative", "questions scored",
                   "calls", "parsed", "unparseable", "failed", "retries"], rows), ""]
    cats = sorted({c for j in judgements.values() for c in j["by_category"]})
    if cats:
        out += [f"Per category (relative score {candidate} / baseline):", ""]
        rows = [[cat] + [fmt(j["by_category"].get(cat, {}).get("relative", math.nan), 3) for j in judgements.values()]
                for cat in cats]
        out += [table(["category"] + list(judgements), rows), ""]
    unscored = {b: j["unscored_questions"] for b, j in judgements.items() if j["unscored_questions"]}
    if unscored:
        out.append("Questions without a valid score in both orders (left out of both totals): "
                   + "; ".join(f"{b}: {', '.join(map(str, q))}" for b, q in unscored.items()))
        out.append("")
    return "\n".join(out)


def answers_page(results: dict[str, dict], question_ids: list[str], title: str) -> str:
    """Table 3 style: the answers of every model to a few questions, side by side."""
    out = [f"# {title}", ""]
    first = next(iter(results.values()))
    by_id = {a["id"]: a for a in first["answers"]}
    for n, qid in enumerate(question_ids, start=1):
        q = by_id[qid]
        out.append(f"## Question {n} ({q['category']})")
        out.append("")
        out.append("> " + cell(q["instruction"]))
        if q.get("context"):
            out.append(">")
            out.append("> " + cell(q["context"]))
        out.append("")
        rows = []
        if q.get("reference"):
            rows.append(["*reference*", cell(q["reference"])])
        for name, r in results.items():
            a = next(x for x in r["answers"] if x["id"] == qid)
            extra = f" (ROUGE-L {a['rouge_l']:.3f})" if "rouge_l" in a else ""
            rows.append([f"**{name}**{extra}", cell(a["answer"]) or "*(empty)*"])
        out += [table(["model", "answer"], rows, numeric=False), ""]
    return "\n".join(out)


def bar_chart(results: dict[str, dict], candidate: str, judgements: dict[str, dict], path: str | Path,
              title: str = "") -> None:
    """ROUGE-L and held-out loss per model, judge relative scores, and ROUGE-L per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    panels = [k for k in ("rouge_l", "loss") if not all(math.isnan(metric(results[n], k)) for n in names)]
    cats = categories(list(results.values())) if "rouge_l" in panels else []
    n_top = len(panels) + (1 if judgements else 0)
    if n_top == 0:
        return
    fig = plt.figure(figsize=(max(10, 3.6 * n_top), 8.5 if cats else 4.2))
    grid = fig.add_gridspec(2 if cats else 1, n_top)
    colors = ["#c44e52" if n == candidate else "#4c72b0" for n in names]
    for i, key in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        vals = [metric(results[n], key) for n in names]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{METRICS[key][0]} ({'higher' if METRICS[key][1] else 'lower'} is better)", fontsize=10)
        for x, v in enumerate(vals):
            if not math.isnan(v):
                ax.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    if judgements:
        ax = fig.add_subplot(grid[0, len(panels)])
        bs = list(judgements)
        vals = [judgements[b]["relative"] for b in bs]
        ax.bar(range(len(bs)), vals, color="#55a868")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(bs)), bs, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"judge: {candidate} / baseline", fontsize=10)
    if cats:
        ax = fig.add_subplot(grid[1, :])
        width = 0.8 / len(names)
        x = np.arange(len(cats))
        for j, n in enumerate(names):
            ax.bar(x + j * width, [metric(results[n], "rouge_l", c) for c in cats], width,
                   label=n, color="#c44e52" if n == candidate else plt.get_cmap("Blues")(0.3 + 0.6 * j / len(names)))
        ax.set_xticks(x + 0.4 - width / 2, [c.replace("_", " ") for c in cats], fontsize=8)
        ax.set_ylabel("ROUGE-L")
        ax.set_title("ROUGE-L per category", fontsize=10)
        ax.legend(fontsize=7, ncol=len(names), loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
