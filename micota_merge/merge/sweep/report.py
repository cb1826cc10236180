"""The sweep's report: Markdown and CSV tables, the ratio plot and the length-accuracy front."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional


def _is_chosen(result: dict, row: dict) -> bool:
    return row["ratio"] == result["chosen"] and row.get("density") == result.get("chosen_density")


def _on_front(result: dict, row: dict) -> bool:
    return [row["ratio"], row.get("density")] in [list(p) for p in result.get("front", [])]


def table_md(result: dict) -> str:
    lines = [
        "| model | ratio | density | accuracy | mean tokens | median tokens | truncated | questions | front |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]

    def row(name, ratio, density, r, front=""):
        def fmt(x, spec):
            return "–" if x is None else format(x, spec)

        lines.append(
            f"| {name} | {ratio} | {density} | {fmt(r.get('accuracy'), '.1%')} | "
            f"{fmt(r.get('mean_tokens'), '.1f')} | {fmt(r.get('median_tokens'), 'g')} | "
            f"{fmt(r.get('truncation_rate'), '.0%')} | {fmt(r.get('records'), 'd')}"
            f"{' (stopped)' if r.get('stopped_early') else ''} | {front} |"
        )

    row("short_cot", "–", "–", result["endpoints"]["short_cot"])
    rows = result["ratios"]
    if result.get("search"):  # probed round by round: shown by ratio
        rows = sorted(rows, key=lambda r: r["ratio"])
    for r in rows:
        mark = " **chosen**" if _is_chosen(result, r) else ""
        # the adaptive search: when each point was probed, and whether its TA was deleted as beaten
        when = f" (round {r['round']}{', TA deleted' if r.get('pruned') else ''})" if "round" in r else ""
        density = f"{r['density']:g}" if r.get("density") is not None else "–"
        row(f"TA{mark}{when}", f"{r['ratio']:g}", density, r, "yes" if _on_front(result, r) else "")
    row("long_cot", "–", "–", result["endpoints"]["long_cot"])
    lines.append(
        f"\ntarget mean length: {result['target_tokens']:.1f} tokens; front: the TAs no other TA dominates "
        "(none is at most as long and at least as accurate, and better in one)"
    )
    stopped = [r for r in rows if r.get("stopped_early")]
    if stopped:
        lines.append(
            f"\nprobes stopped early (sweep.early_stop): {len(stopped)} of {len(rows)} points, "
            f"{sum(r['records'] for r in rows)} questions answered by the TAs in all"
        )
        for r in sorted(stopped, key=lambda r: (r["ratio"], r.get("density") or 0.0)):
            lines.append(f"- ratio {r['ratio']:g}: {r['stopped_early']}")
    search = result.get("search")
    if search:
        lines.append(
            f"\nadaptive search: {search['probed']} points in {search['rounds']} rounds, each splitting the bracket "
            f"of the target between the probed lengths; stopped because {search['stopped']}"
            + "".join(f"; note: {n}" for n in search.get("notes", []))
        )
        for r in sorted(rows, key=lambda r: (r["round"], r["ratio"])):
            lines.append(f"- round {r['round']}: ratio {r['ratio']:g} {r['why']}")
    return "\n".join(lines)


def table_csv(result: dict) -> str:
    buf = io.StringIO()
    fields = [
        "model",
        "ratio",
        "density",
        "accuracy",
        "mean_tokens",
        "median_tokens",
        "p90_tokens",
        "truncation_rate",
        "records",
        "stopped_early",
        "front",
        "chosen",
    ]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerow({"model": "short_cot", **result["endpoints"]["short_cot"], "ratio": ""})
    for r in result["ratios"]:
        w.writerow({"model": "ta", **r, "front": _on_front(result, r), "chosen": _is_chosen(result, r)})
    w.writerow({"model": "long_cot", **result["endpoints"]["long_cot"], "ratio": ""})
    return buf.getvalue()


def _densities(result: dict) -> list:
    return sorted({r.get("density") for r in result["ratios"]}, key=lambda d: (d is None, d or 0.0))


def plot(result: dict, path: Path) -> None:
    """Mean length and accuracy against the ratio, one line per density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax2 = ax.twinx()
    densities = _densities(result)
    for i, d in enumerate(densities):
        rows = [r for r in result["ratios"] if r.get("density") == d]
        xs = [r["ratio"] for r in rows]
        suffix = f" (density {d:g})" if d is not None and len(densities) > 1 else ""
        ls = ["-", "--", ":", "-."][i % 4]
        ax.plot(xs, [r["mean_tokens"] for r in rows], "o", ls=ls, color="tab:blue", label=f"TA mean tokens{suffix}")
        ax2.plot(
            xs, [100 * (r["accuracy"] or 0) for r in rows], "o", ls=ls, color="tab:red", label=f"TA accuracy{suffix}"
        )
    for role, x, style in (("short_cot", 0.0, "s"), ("long_cot", 1.0, "D")):
        ax.plot(
            [x],
            [result["endpoints"][role]["mean_tokens"]],
            style,
            color="tab:blue",
            mfc="none",
            ms=9,
            label=f"{role} checkpoint",
        )
        ax2.plot([x], [100 * (result["endpoints"][role]["accuracy"] or 0)], style, color="tab:red", mfc="none", ms=9)
    ax.axhline(result["target_tokens"], color="tab:blue", ls=":", lw=1, label="target length")
    # the length cap: answers at it were cut off, so their mean is a floor, not a length
    cap = (result.get("probe") or {}).get("max_tokens")
    tops = [r["mean_tokens"] or 0 for r in result["ratios"]] + [
        result["endpoints"][role]["mean_tokens"] or 0 for role in ("short_cot", "long_cot")
    ]
    if cap and cap <= 2 * max(tops + [result["target_tokens"] or 0]):
        ax.axhline(cap, color="black", ls="--", lw=1, label=f"length cap ({cap})")
    elif cap:
        ax.annotate(
            f"length cap {cap} (off scale)", (0.01, 0.99), xycoords="axes fraction", ha="left", va="top", fontsize=8
        )
    for r in result["ratios"]:
        if r.get("truncation_rate"):
            ax.annotate(
                f"{r['truncation_rate']:.0%} cut",
                (r["ratio"], r["mean_tokens"]),
                xytext=(0, -12),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color="tab:blue",
            )
    ax.set_xlabel("ratio (long-CoT share)")
    ax.set_ylabel("mean response tokens", color="tab:blue")
    ax2.set_ylabel("accuracy (%)", color="tab:red")
    ax2.set_ylim(0, 105)  # 0 % sits on the axis, visibly; 100 % and the experts' markers are not clipped
    ax.axvline(result["chosen"], color="gray", ls="--", lw=1)
    label = f"chosen {result['chosen']:g}"
    if result.get("chosen_density") is not None and len(densities) > 1:
        label += f" / density {result['chosen_density']:g}"
    lo, hi = ax.get_xlim()
    right = result["chosen"] > lo + 0.75 * (hi - lo)  # left of the line near the right spine: never past it
    ax.annotate(
        label,
        (result["chosen"], 0.0),
        xycoords=("data", "axes fraction"),
        xytext=(-3 if right else 3, 3),
        textcoords="offset points",
        ha="right" if right else "left",
        va="bottom",
        fontsize=9,
        color="gray",
        bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.5},
    )
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    # below the axes: a legend inside would cover points
    fig.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower center", ncol=3, frameon=False)
    ax.set_title(
        f"{result['method']} sweep on {result['probe'].get('questions') or result['probe']['benchmark']}", pad=10
    )
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


_NEAR = [(4, 4), (4, -11), (-4, 4), (-4, -11), (0, 9), (0, -15)]
_FAR = _NEAR + [(10, 12), (10, -18), (-10, 12), (-10, -18), (0, 18), (0, -24)]


def _place_labels(
    ax, anchors: list[tuple[float, float, str, bool]], fontsize: float = 7, avoid: Optional[list] = None
) -> list[str]:
    """Write each (x, y, text, far) beside its point where it overlaps no label already written (nor the
    boxes in `avoid`, display coordinates) and stays inside the axes: the first free spot among a few
    offsets around the point (a few more, further out, when `far`). A label with no free spot is left
    out; the texts left out are returned."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed = list(avoid or [])
    frame = ax.get_window_extent(renderer)
    left_out = []
    for x, y, text, far in anchors:
        for dx, dy in _FAR if far else _NEAR:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            t = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                ha=ha,
                va="bottom",
                zorder=7,
            )
            box = t.get_window_extent(renderer).padded(2)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(p) for p in placed):
                placed.append(box)
                break
            t.remove()
        else:
            left_out.append(text)
    return left_out


def plot_front(result: dict, path: Path) -> None:
    """Accuracy against mean length for every point, the Pareto front, the experts and the choice.

    Points measured alike (the same length and accuracy) get one label listing their ratios; labels
    are placed where they overprint no other label or marker. The chosen point and the front are
    labelled first; with more than a dozen places only they are, and a label with no room is left
    out: a note under the legend says so (the sweep table has every point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    chosen = _draw_front(ax, result)
    fig.tight_layout()
    _label_front(fig, ax, result, chosen)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _draw_front(ax, result: dict) -> dict:
    """Every point, the front, the experts, the chosen point and the target, floor and cap lines; returns
    the chosen row."""
    densities = _densities(result)
    grid = len(densities) > 1
    markers = "o^vsPX*"
    for i, d in enumerate(densities):
        rows = [r for r in result["ratios"] if r.get("density") == d]
        ax.scatter(
            [r["mean_tokens"] for r in rows],
            [100 * (r["accuracy"] or 0) for r in rows],
            marker=markers[i % len(markers)],
            color="tab:gray",
            zorder=3,
            label="TA" + (f", density {d:g}" if d is not None else ""),
        )
    front = [r for r in result["ratios"] if _on_front(result, r)]
    front.sort(key=lambda r: r["mean_tokens"])
    if front:
        xs, ys = [r["mean_tokens"] for r in front], [100 * (r["accuracy"] or 0) for r in front]
        ax.step(xs, ys, where="post", color="tab:green", lw=1.5, zorder=2)
        ax.scatter(
            xs,
            ys,
            s=90,
            facecolors="none",
            edgecolors="tab:green",
            lw=1.5,
            zorder=4,
            label="Pareto front (no other TA shorter and as accurate)",
        )
    for role, style, color in (("short_cot", "s", "tab:blue"), ("long_cot", "D", "tab:red")):
        e = result["endpoints"][role]
        ax.plot(
            [e["mean_tokens"]],
            [100 * (e["accuracy"] or 0)],
            style,
            color=color,
            ms=9,
            mfc="none",
            mew=2,
            label=f"{role} checkpoint",
            zorder=5,
        )
    chosen = next(r for r in result["ratios"] if _is_chosen(result, r))
    ax.scatter(
        [chosen["mean_tokens"]],
        [100 * (chosen["accuracy"] or 0)],
        s=220,
        marker="*",
        color="gold",
        edgecolors="black",
        zorder=6,
        label="chosen",
    )
    ax.axvline(result["target_tokens"], color="gray", ls=":", lw=1, label="target length")
    floor = 100 * max(r["accuracy"] or 0 for r in result["ratios"]) - result["tolerance"]
    ax.axhline(floor, color="gray", ls="--", lw=0.8, label=f"accuracy floor (best - {result['tolerance']:g})")
    cap = (result.get("probe") or {}).get("max_tokens")
    if cap and cap <= 2 * max([r["mean_tokens"] or 0 for r in result["ratios"]] + [result["target_tokens"] or 0]):
        ax.axvline(cap, color="black", ls="--", lw=1, label=f"length cap ({cap})")
    ax.set_ylim(min(0, ax.get_ylim()[0]), 109)  # markers near 100 % and their labels are not clipped
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 100])
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(
        f"{result['method']}: length-accuracy front (labels: ratio" + ("/density" if grid else "") + ")", pad=10
    )
    return chosen


def _label_front(fig, ax, result: dict, chosen: dict) -> None:
    """Labels where they overprint nothing, the legend under the axes, and a note of what was left out."""
    grid = len(_densities(result)) > 1
    # labels: one per place (points measured alike share it), the chosen point's first, then the front's
    fig.canvas.draw()
    to_px = ax.transData.transform
    clusters: list[list[dict]] = []
    for r in result["ratios"]:
        px = to_px((r["mean_tokens"], 100 * (r["accuracy"] or 0)))
        for c in clusters:
            q = to_px((c[0]["mean_tokens"], 100 * (c[0]["accuracy"] or 0)))
            if abs(px[0] - q[0]) < 2 and abs(px[1] - q[1]) < 2:
                c.append(r)
                break
        else:
            clusters.append([r])

    def name(r: dict) -> str:
        return f"{r['ratio']:g}/{r['density']:g}" if grid and r.get("density") is not None else f"{r['ratio']:g}"

    def text(c: list[dict]) -> str:
        names = [name(r) for r in sorted(c, key=lambda r: (r.get("density") or 0, r["ratio"]))]
        return ", ".join(names) if len(names) <= 6 else f"{names[0]} … {names[-1]} ({len(names)} points)"

    def rank(c: list[dict]) -> tuple:
        return (
            not any(_is_chosen(result, r) for r in c),
            not any(_on_front(result, r) for r in c),
            c[0]["mean_tokens"],
        )

    clusters.sort(key=rank)
    # the markers themselves are not written over (the chosen star, the experts' squares, every point)
    from matplotlib.transforms import Bbox

    marks = []
    for x, y, size in (
        [(chosen["mean_tokens"], 100 * (chosen["accuracy"] or 0), 9)]
        + [
            (result["endpoints"][role]["mean_tokens"], 100 * (result["endpoints"][role]["accuracy"] or 0), 6)
            for role in ("short_cot", "long_cot")
        ]
        + [(r["mean_tokens"], 100 * (r["accuracy"] or 0), 3) for r in result["ratios"]]
    ):
        px = to_px((x, y))
        marks.append(Bbox.from_extents(px[0] - size, px[1] - size, px[0] + size, px[1] + size))
    crowded = len(clusters) > 12
    key = [c for c in clusters if rank(c)[:2] != (True, True)]  # the chosen point's and the front's
    shown = key if crowded else clusters
    left_out = _place_labels(
        ax, [(c[0]["mean_tokens"], 100 * (c[0]["accuracy"] or 0), text(c), c in key) for c in shown], avoid=marks
    )
    legend = fig.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    notes = (["only the chosen point and the front are labelled"] if crowded else []) + (
        [f"no room to label {', '.join(left_out)}"] if left_out else []
    )
    if notes:  # under the legend, outside the axes: nothing is covered
        fig.canvas.draw()
        box = legend.get_window_extent().transformed(fig.transFigure.inverted())
        fig.text(
            0.5,
            box.y0 - 0.01,
            "; ".join(notes) + "; every point is in the sweep table",
            ha="center",
            va="top",
            fontsize=7,
            color="0.3",
        )
