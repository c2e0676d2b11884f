"""The vector diagnostics in the report: tables (Markdown lines or rows) and one heatmap figure.

Input is the dict of `dem_ray.core.diagnostics.vector_diagnostics`, read from
report.json or computed on the spot; nothing here reads a vector file. Groups that
hold no tensors (parameters 0) are left out of the tables and the figure.
"""

from __future__ import annotations

import math
from pathlib import Path

from dem_ray.core.diagnostics import mean_offdiagonal


def present_groups(diag: dict) -> list[str]:
    """The groups that hold at least one parameter, in order."""
    return [g for g in diag["groups"] if diag["parameters_by_group"].get(g, 0) > 0]


def fmt_norm(value: float) -> str:
    return f"{value:#.4g}"  # 4 significant digits, zeros kept


def fmt_cosine(value: float) -> str:
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text


# ---- rows (for Markdown here, and for HTML tables in render.py) ---------------------------
def norm_rows(diag: dict) -> list[list[str]]:
    """One row per dataset: its L2 norm over the whole model and within each group."""
    groups = present_groups(diag)
    rows = [["dataset", "model", *groups]]
    for name in diag["datasets"]:
        rows.append([
            name,
            fmt_norm(diag["norm"][name]),
            *(fmt_norm(diag["norm_by_group"][g][name]) for g in groups),
        ])  # fmt: skip
    return rows


def cosine_rows(diag: dict) -> list[list[str]]:
    """The whole-model cosine matrix, datasets down and across."""
    names = diag["datasets"]
    rows = [["", *names]]
    for name, values in zip(names, diag["cosine"], strict=True):
        rows.append([name, *(fmt_cosine(v) for v in values)])
    return rows


def pair_rows(diag: dict) -> list[list[str]]:
    """One row per pair of datasets: its cosine over the whole model and within each group."""
    names, groups = diag["datasets"], present_groups(diag)
    rows = [["pair", "model", *groups]]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            rows.append([
                f"{names[i]} / {names[j]}",
                fmt_cosine(diag["cosine"][i][j]),
                *(fmt_cosine(diag["cosine_by_group"][g][i][j]) for g in groups),
            ])  # fmt: skip
    return rows


def summary_sentence(diag: dict) -> str:
    names, cosine = diag["datasets"], diag["cosine"]
    if len(names) < 2:
        return "Only one vector: there are no pairs to compare."
    mean = mean_offdiagonal(cosine)
    pairs = [(cosine[i][j], i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    top, i, j = max(pairs)
    return (
        f"Mean pairwise cosine {fmt_cosine(mean)} over the whole model (0: independent "
        f"directions), the most aligned pair being {names[i]} / {names[j]} at "
        f"{fmt_cosine(top)}; vectors that share a direction interfere when added."
    )


def markdown_lines(rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(r) + " |" for r in rows[1:]),
    ]


def diagnostics_markdown(diag: dict) -> list[str]:
    """Markdown lines: norms, the whole-model cosine matrix, per-group cosines, a summary."""
    groups = present_groups(diag)
    lines = [
        "L2 norm of each distribution vector, over the whole model and within each block "
        f"group ({_groups_legend(groups)}):",
        "",
        *markdown_lines(norm_rows(diag)),
        "",
    ]
    if len(diag["datasets"]) >= 2:
        lines += [
            "Cosine similarity between the vectors over the whole model:",
            "",
            *markdown_lines(cosine_rows(diag)),
            "",
            "Cosine similarity of each pair within each block group:",
            "",
            *markdown_lines(pair_rows(diag)),
            "",
        ]
    lines.append(summary_sentence(diag))
    return lines


def _groups_legend(groups: list[str]) -> str:
    blocks = [g for g in groups if g.startswith("block")]
    parts = []
    if "embed" in groups:
        parts.append("`embed`: token embeddings")
    if blocks:
        parts.append(f"`{blocks[0]}`-`{blocks[-1]}`: contiguous groups of layers")
    if "head" in groups:
        parts.append("`head`: final norm, LM head and the rest")
    return "; ".join(parts)


# ---- figure -------------------------------------------------------------------------------
def plot_similarity(diag: dict, path: Path) -> Path:
    """One PNG: the whole-model cosine heatmap, and a small one per block group, on [-1, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = diag["datasets"]
    k = len(names)
    groups = present_groups(diag)
    rows = 2 if len(groups) <= 6 else 3
    cols = max(1, math.ceil(len(groups) / rows))
    unit = max(1.5, 0.3 * k)  # inches of one small panel; the whole-model panel is `rows` units
    fig = plt.figure(figsize=(unit * (rows + cols) + 1.2, unit * rows + 0.9), dpi=110,
                     layout="constrained")  # fmt: skip
    grid = fig.add_gridspec(rows, rows + cols)
    big = fig.add_subplot(grid[:, :rows])
    labels = [f"{i + 1} {_short(n, 16)}" for i, n in enumerate(names)]
    image = _heatmap(big, diag["cosine"], labels, _font(unit * rows / k, 10))
    big.set_xticklabels(labels, rotation=45, ha="right", rotation_mode="anchor")
    big.set_title("whole model")
    small_labels = [str(i + 1) for i in range(k)]  # the numbers of the whole-model panel
    axes = [big]
    for index, group in enumerate(groups):
        ax = fig.add_subplot(grid[index // cols, rows + index % cols])
        _heatmap(ax, diag["cosine_by_group"][group], small_labels, _font(unit / k, 8))
        ax.set_title(f"{group}\n{_count(diag['parameters_by_group'][group])}", fontsize=8)
        ax.tick_params(labelsize=7)
        axes.append(ax)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle("Distribution vectors: cosine similarity (vectors that share a direction "
                 "interfere when added)", fontsize=10)  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _heatmap(ax, matrix: list[list[float]], labels: list[str], fontsize: float):
    k = len(matrix)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), labels)
    for i in range(k):
        for j in range(k):
            value = matrix[i][j]
            ax.text(j, i, _cell(value), ha="center", va="center", fontsize=fontsize,
                    color="white" if abs(value) > 0.6 else "black")  # fmt: skip
    return image


def _cell(value: float) -> str:
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def _font(cell_inches: float, largest: float) -> float:
    """A font size whose `-0.00` fits in a cell `cell_inches` wide."""
    return max(4.5, min(largest, cell_inches * 72 * 0.3))


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix} params"
    return f"{n} params"
