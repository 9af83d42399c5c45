"""The reproduction's report: the tables as Markdown, and the plots (paired differences, omission rates, router
convergence, accuracy against k). Everything here renders results already computed (:mod:`pudding.evaluation.tables`);
nothing is measured."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from pudding.core.provenance import atomic_write_figure, atomic_write_json, provenance
from pudding.evaluation.tables import RowId
from pudding.routing.train import RoutingData


def render_table(title: str, table: dict[str, Any], note: str = "") -> str:
    tasks = list(table["metrics"])
    lines = [f"### {title}", "", *([note, ""] if note else []),
             "| row | " + " | ".join(f"{t} ({table['metrics'][t]})" for t in tasks) + " | average |",
             "|---" * (len(tasks) + 2) + "|"]
    for row, data in table["rows"].items():
        cells = [f"{data['tasks'][t]['value']:.3f} ± {data['tasks'][t]['stderr']:.3f}" if t in data["tasks"] else "-"
                 for t in tasks]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | **{data['average']:.3f}** |")
    n = {t: next(iter(table["rows"].values()))["tasks"][t]["n"] for t in tasks}
    lines += ["", "N per task: " + ", ".join(f"{t} {n[t]}" for t in tasks) + ". Mean ± standard error.", ""]
    return "\n".join(lines)


def render_paired(differences: dict[str, dict], ours: str) -> str:
    lines = [f"Paired differences, {ours} minus each static row, over all documents (95% interval):", ""]
    for other, d in differences.items():
        lines.append(f"- vs {other}: {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (N={d['n']})")
    return "\n".join(lines) + "\n"


def render_headroom(headroom: dict[str, Any]) -> str:
    lines = [f"Where routing can matter: of {headroom['documents']} documents, every pool set is right on "
             f"{headroom['all_sets_right']} and wrong on {headroom['all_sets_wrong']}; the sets disagree on "
             f"{headroom['mixed']}. Two of the {headroom['pool_sets']} sets share "
             f"{headroom['mean_shared_blocks_per_pair']:.1f} of {headroom['k']} blocks on average.", ""]
    if headroom["accuracy_on_mixed"]:
        lines.append("Accuracy on the documents where the sets disagree: " + ", ".join(
            f"{row} {v['value']:.3f} ± {v['stderr']:.3f}" for row, v in headroom["accuracy_on_mixed"].items()) + ".")
    return "\n".join(lines) + "\n"


def render_decomposition(decomposition: dict[str, dict]) -> str:
    lines = ["Where the gap is (paired differences over all documents, 95% interval): the task-best set is chosen "
             "on calibration data, the pool ceiling on these documents (hindsight), so the ceiling minus the best "
             "static set bounds what choosing one set per task could win from these sets:", ""]
    for name, d in decomposition.items():
        lines.append(f"- {name}: {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    return "\n".join(lines) + "\n"


def render_selection(selection: dict[str, Any]) -> str:
    lines = ["Validation accuracy on calibration prompts (held out from each router's training; cross-fitted for "
             "safe routing), which chose the best variant; share of evaluation documents routed away from the "
             "default set for the safe ones:", ""]
    for name, value in selection["validation_accuracy"].items():
        switch = selection["evaluation_switch_rate"].get(name)
        lines.append(f"- {name}: {value:.3f}" + (f", switches on {switch:.1%}" if switch is not None else "")
                     + (" **(chosen)**" if name == selection["best"] else ""))
    lines.append(f"\nPool size chosen on calibration data: {selection['pool_size_chosen']}.")
    return "\n".join(lines) + "\n"


def render_spread(spread: dict[str, float]) -> str:
    return (f"Average over the {spread['seeds']} seeds: {spread['mean']:.3f}, standard deviation "
            f"{spread['sd']:.3f}, range {spread['min']:.3f} to {spread['max']:.3f}.\n")


# rows scored outside a reproduction, written beside its main.json by benchmarks/baselines_table.py
REVIEWER_BASELINES = "reviewer-baselines.json"
SPLIT_TITLES = {"main": "Main table (paper Table 1)", "generalisation": "Unseen tasks (paper Table 5)"}


def render_report(title: str, tables: dict[str, dict], ablations: dict[str, dict], figures: list[str],
                  stamp: dict[str, Any]) -> str:
    """The README of a reproduction: ``title``, each split's table with its paired differences and headroom,
    every ablation, then ``figures`` (Markdown lines) and the command, commit and date of ``stamp``."""
    markdown = [title, ""]
    for name, table in tables.items():
        markdown.append(render_table(SPLIT_TITLES[name], table))
        for row, differences in table["paired_differences"].items():
            markdown.append(render_paired(differences, row))
        markdown.append(render_headroom(table["headroom"]))
        if table.get("decomposition"):
            markdown.append(render_decomposition(table["decomposition"]))
    for name, table in ablations.items():
        markdown.append(render_table(f"Ablation: {name.replace('_', ' ')}", table))
        if "spread" in table:
            markdown.append(render_spread(table["spread"]))
        if "selection" in table:
            markdown.append(render_selection(table["selection"]))
    markdown += figures
    return ("\n".join(markdown) + f"\nCommand: `{' '.join(stamp['command'])}`; "
            f"commit {stamp['git'].get('commit', '?')}; {stamp['date']}.\n")


# --- plots ----------------------------------------------------------------------------------------------------


def _pyplot():
    from pudding.core.extras import pyplot

    return pyplot()


def plot_omission_rates(data: RoutingData, chosen_blocks: list[tuple], total: int, path: Path) -> dict:
    """How often the router omits each block, per task (a heat map at ``path``); returns the rates by task."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(data.tasks))
    rates = []
    for task in tasks:
        rows = [b for b, t in zip(chosen_blocks, data.tasks) if t == task]
        rates.append([sum(block in b for b in rows) / len(rows) for block in range(total)])
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(tasks) + 1.5))
    image = ax.imshow(rates, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(total), yticks=range(len(tasks)), yticklabels=tasks, xlabel="block",
           title="How often the router omits each block, per task")
    fig.colorbar(image, ax=ax, label="omission rate")
    fig.tight_layout()
    atomic_write_figure(fig, path)
    return {t: r for t, r in zip(tasks, rates)}


def plot_convergence(router_dirs: dict[str, Path], path: Path) -> None:
    """Validation loss per epoch of every router (the convergence curves the reviewers asked for)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, folder in router_dirs.items():
        history_file = Path(folder) / "training.json"
        if not history_file.exists():
            continue
        history = json.loads(history_file.read_text())["history"]
        epochs = [r["epoch"] for r in history]
        axes[0].plot(epochs, [r["val_loss"] for r in history], label=name)
        axes[1].plot(epochs, [r["val"]["top1_agreement"] for r in history], label=name)
    axes[0].set(xlabel="epoch", ylabel="validation loss (own loss, own scale)", title="router convergence")
    axes[1].set(xlabel="epoch", ylabel="top-1 agreement with the oracle", title="validation routing")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_figure(fig, path)


def plot_paired_differences(table: dict[str, Any], path: Path, title: str = "PuDDing minus each static row"
                            ) -> dict[str, dict[str, dict[str, list[float]]]]:
    """The main table's answer in one picture: each PuDDing row minus each static row (left, one colour per
    PuDDing row; ``title`` names the panel) and the gap's decomposition (right), as paired differences with their
    95% intervals. Returns what it drew, by panel, series and bar: ``[difference, low, high]``."""
    plt = _pyplot()
    panels = {title: {ours: {other: _interval(d) for other, d in against.items()}
                                                for ours, against in table["paired_differences"].items()},
              "where the gap is": {"": {name: _interval(d) for name, d in table.get("decomposition", {}).items()}}}
    panels = {title: series for title, series in panels.items() if any(series.values())}
    tallest = max(len({bar for bars in series.values() for bar in bars}) for series in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.5 * tallest + 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        names = list(dict.fromkeys(bar for bars in series.values() for bar in bars))[::-1]  # the first on top
        for i, (label, bars) in enumerate(series.items()):
            offset = -0.6 * (i - (len(series) - 1) / 2) / len(series)  # the legend's first series on top
            where = [(names.index(n) + offset, bars[n]) for n in names if n in bars]
            ax.errorbar([v[0] for _, v in where], [y for y, _ in where], fmt="o", markersize=4, capsize=2,
                        xerr=[[v[0] - v[1] for _, v in where], [v[2] - v[0] for _, v in where]], label=label or None)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(range(len(names)), ["\n".join(textwrap.wrap(n, 40)) for n in names], fontsize=8)
        ax.set(xlabel="accuracy difference (paired, 95% interval)", title=title)
        if len(series) > 1:  # below the axes: inside, it would hide the top rows
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    fig.tight_layout()
    atomic_write_figure(fig, path)
    return panels


def _interval(difference: dict[str, Any]) -> list[float]:
    return [difference["difference"], *difference["ci95"]]


def _average_with_stderr(row: dict[str, Any]) -> tuple[float, float]:
    """A row's average over tasks and its standard error (the tasks' documents are independent)."""
    cells = list(row["tasks"].values())
    return row["average"], sum(c["stderr"] ** 2 for c in cells) ** 0.5 / len(cells)


def plotted_rows(data: dict[str, Any], folder: Path) -> dict[str, str]:
    """The accuracy-against-k series of a saved main table, by row label: each row's id is rendered from the
    table's recorded config (and the best variant's name from the folder's routing ablation), so a label is
    only ever produced, never parsed."""
    series = {RowId(method).label: method for method in ("dense", "sleb", "best static set", "task-best set",
                                                         "oracle")}
    config = data.get("config", {})
    if config.get("routers"):
        paper = RowId("pudding", router="-".join(config["routers"][0]), role="paper")
        series[paper.label] = "PuDDing (paper)"
    routing = folder / "ablation-routing.json"
    best = json.loads(routing.read_text()).get("selection", {}).get("best") if routing.exists() else None
    if best and config.get("router_seeds", 1) > 1:
        seeds = RowId("pudding", router=best, role="best variant", seeds=config["router_seeds"])
        series[seeds.label] = "PuDDing, best variant (seed mean)"
    return series


def plot_accuracy_vs_k(parent: Path, budget: str) -> dict[str, Any] | None:
    """Collect ``parent/k*/main.json`` of one budget into accuracy against k (dense, SLEB, the best static
    set, the task-best set, PuDDing as the paper builds it, the best variant, the oracle, and the rows of a
    ``reviewer-baselines.json`` beside a table: LaCo, LLM-Streamline, FinerCut); writes
    ``accuracy-vs-k-<budget>.json`` and ``.png`` in ``parent``, so budgets never mix. None if no k exists."""
    plt = _pyplot()
    runs = []
    for path in parent.glob("k*/main.json"):
        data = json.loads(path.read_text())
        if data.get("config", {}).get("budget") == budget:
            runs.append((data["config"]["k"], path, data))
    if not runs:
        return None
    runs.sort(key=lambda run: run[0])
    series: dict[str, list] = {}
    external: set[str] = set()
    sources = []
    for k, path, data in runs:
        plotted = plotted_rows(data, path.parent)
        for row, values in data["rows"].items():
            if row in plotted:
                series.setdefault(plotted[row], []).append([k, *_average_with_stderr(values)])
        sources.append({"k": k, "file": str(path), "commit": data["provenance"]["git"].get("commit"),
                        "date": data["provenance"]["date"]})
        extra = path.with_name(REVIEWER_BASELINES)
        if extra.exists():  # rows scored outside the run: LaCo, LLM-Streamline, FinerCut (baselines_table.py)
            rows = json.loads(extra.read_text())
            for row, kind in rows["kinds"].items():
                if kind == "external":
                    series.setdefault(row, []).append([k, *_average_with_stderr(rows["rows"][row])])
                    external.add(row)
            sources.append({"k": k, "file": str(extra), "commit": rows["provenance"]["git"].get("commit"),
                            "date": rows["provenance"]["date"]})
    series["dense"] = [[0, *series["dense"][0][1:]]] + series["dense"]  # dense does not depend on k
    fig, ax = plt.subplots(figsize=(9, 4))
    colours = plt.get_cmap("tab20").colors  # the default cycle repeats after ten rows
    for i, (label, points) in enumerate(series.items()):
        ks, means, errors = zip(*points)
        colour = colours[(2 * i) % 20 + (2 * i) // 20]  # the dark shades first, then the light ones
        ax.errorbar(ks, means, yerr=errors, marker="s" if label in external else "o", capsize=3, label=label,
                    color=colour, linestyle="--" if label in ("dense", "oracle") else "-")
    ax.set(xlabel="blocks removed (k)", ylabel="average accuracy, six paper tasks",
           xticks=[0, *[k for k, _, _ in runs]],
           title=f"Accuracy against k ({budget} budget; bars: standard error)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: no point hidden
    fig.tight_layout()
    atomic_write_figure(fig, parent / f"accuracy-vs-k-{budget}.png")
    result = {"budget": budget, "series": {label: [dict(zip(("k", "average", "stderr"), p)) for p in points]
                                          for label, points in series.items()},
              "sources": sources,
              "provenance": provenance()}
    atomic_write_json(parent / f"accuracy-vs-k-{budget}.json", result)
    return result
