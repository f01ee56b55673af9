"""Tables (CSV, console) and plots (PNG, one line per model) from the result records."""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(path, buffer.getvalue().encode())


def format_table(rows: list[dict]) -> str:
    """Rows as aligned text columns (floats with 2 decimals)."""
    if not rows:
        return "(no results)"
    cells = [list(rows[0])] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def _length_label(n: float) -> str:
    return f"{int(n) // 1024}k" if n >= 1024 and n % 1024 == 0 else f"{n:g}"


def _plot(path: Path, panels: dict[str, dict[str, list[tuple[float, float]]]], xlabel: str, ylabel: str,
          log2_x: bool, ylim: tuple[float, float] | None = None) -> None:
    """One subplot per panel, one line per model: panels[title][model] = [(x, y), ...]."""
    from matplotlib.figure import Figure  # slow to import: only when plotting

    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4 * columns, 3.4 * rows) if len(panels) > 1 else (6.4, 4.4))
    fig.subplots_adjust(left=0.06 if columns > 1 else 0.15, right=0.98, bottom=0.12 if rows > 1 else 0.15,
                        top=0.93 if rows > 1 else 0.9, hspace=0.45, wspace=0.3)
    for i, (title, lines) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, columns, i + 1)
        xs_all = sorted({x for line in lines.values() for x, _ in line})
        log2 = log2_x and xs_all[0] > 0  # log2 positions on a linear axis: cheaper than a log scale
        for model, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot([math.log2(x) for x in xs] if log2 else xs, ys, marker="o", label=model)
        if log2:
            ax.set_xticks([math.log2(x) for x in xs_all], [_length_label(x) for x in xs_all])
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _atomic_write(path, buffer.getvalue())


def beyond_context(rows: list[dict], key: str, requested: dict[str, list[int]], contexts: dict[str, int],
                   fits, skipped_note: str) -> list[dict]:
    """`rows` (each with `model` and `key`) with a `note` column: "beyond its context N" where
    `fits(length, N)` is false, and a row `skipped_note` for each length in `requested[model]` that has
    none (not evaluated: beyond the model's context)."""
    columns = list(rows[0]) if rows else ["model", key]
    out = []
    for model in dict.fromkeys([*requested, *(r["model"] for r in rows)]):
        context = contexts.get(model)
        mine = {r[key]: r for r in rows if r["model"] == model}
        for length in sorted({*mine, *(n for n in requested.get(model, []) if not fits(n, context))}):
            if length in mine:
                note = "" if context is None or fits(length, context) else f"beyond its context {context}"
                out.append({**mine[length], "note": note})
            else:
                blank = {c: "" for c in columns}
                out.append({**blank, "model": model, key: length, "note": skipped_note.format(context=context)})
    return out


def ruler_report(records: list[dict], models: list[str], tasks: list[str], out: Path, annotate=None) -> list[dict]:
    """ruler_scores.csv / .png: mean RULER-style score x100 per model, length and task, and the task average.
    `annotate(rows)`: rows as tabled (e.g. `beyond_context` notes)."""
    scores = defaultdict(list)
    for r in records:
        scores[r["model"], r["length"], r["task"]].append(r["score"])
    rows, panels = [], defaultdict(lambda: defaultdict(list))
    for model in models:
        for length in sorted({length for m, length, _ in scores if m == model}):
            row = {"model": model, "length": length}
            for task in tasks:
                values = scores.get((model, length, task))
                row[task] = 100 * sum(values) / len(values) if values else float("nan")
                if values:
                    panels[task][model].append((length, row[task]))
            present = [row[t] for t in tasks if not math.isnan(row[t])]
            row["average"] = sum(present) / len(present)
            row["samples"] = sum(len(scores.get((model, length, t), [])) for t in tasks)
            panels["average over tasks"][model].append((length, row["average"]))
            rows.append(row)
    rows = annotate(rows) if annotate else rows
    write_csv(out / "ruler_scores.csv", rows)
    if rows:
        _plot(out / "ruler_scores.png", dict(panels), "length (tokens)", "RULER-style score (x100)", log2_x=True,
              ylim=(-3, 103))
    return rows


def sliding_ppl_report(records: list[dict], models: list[str], out: Path, annotate=None) -> list[dict]:
    """sliding_ppl.csv / perplexity_vs_context.png (final block) and loss_by_position.csv / .png.
    `annotate(rows)`: the final-block rows as tabled (e.g. `beyond_context` notes)."""
    block = defaultdict(lambda: [0.0, 0, 0])
    position = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for r in records:
        if r["kind"] == "final_block":
            acc = block[r["model"], r["length"]]
            acc[0] += r["loss_sum"]
            acc[1] += r["tokens"]
            acc[2] += 1
        else:
            edges = r["bucket_edges"]
            for a, b, total in zip(edges, edges[1:], r["bucket_loss_sums"]):
                acc = position[r["model"]][a, b]
                acc[0] += total
                acc[1] += b - a
    rows, ppl_lines, pos_rows, pos_lines = [], {}, [], {}
    for model in models:
        for context in sorted(c for m, c in block if m == model):
            loss, tokens, docs = block[model, context]
            rows.append({"model": model, "context": context, "documents": docs, "tokens": tokens,
                         "loss": loss / tokens, "perplexity": math.exp(loss / tokens)})
            ppl_lines.setdefault(model, []).append((context, math.exp(loss / tokens)))
        for (a, b), (loss, tokens) in sorted(position.get(model, {}).items()):
            if tokens:
                pos_rows.append({"model": model, "position_start": a, "position_end": b, "loss": loss / tokens})
                pos_lines.setdefault(model, []).append(((a + b) / 2, loss / tokens))
    rows = annotate(rows) if annotate else rows
    write_csv(out / "sliding_ppl.csv", rows)
    write_csv(out / "loss_by_position.csv", pos_rows)
    if ppl_lines:
        _plot(out / "perplexity_vs_context.png", {"final block perplexity": ppl_lines},
              "preceding context (tokens)", "perplexity", log2_x=False)
    if pos_lines:
        _plot(out / "loss_by_position.png", {"loss by token position": pos_lines}, "position (tokens)", "loss",
              log2_x=False)
    return rows


def recall_report(records: list[dict], models: list[str], out: Path) -> list[dict]:
    """recall.csv (per model and task: loss and argmax accuracy on the recall tokens, the accuracy a
    uniform guess expects (nan where the task's answers mix alphabets), the loss on the others) and recall_loss_by_position.csv / .png (mean loss per position bucket, with the fraction
    of the bucket's tokens that are recall tokens)."""
    totals = defaultdict(lambda: defaultdict(float))
    position = defaultdict(lambda: defaultdict(lambda: [0.0, 0, 0]))
    for r in records:
        for task in (r["task"], "all"):
            acc = totals[r["model"], task]
            acc["records"] += 1
            for key in ("recall_tokens", "recall_loss_sum", "recall_hits", "other_tokens", "other_loss_sum"):
                acc[key] += r[key]
            known = r.get("recall_chance") is not None and acc.get("chance", 0.0) is not None
            acc["chance"] = acc.get("chance", 0.0) + r["recall_chance"] if known else None  # None: unknown
        edges = r["bucket_edges"]
        for a, b, loss, recall in zip(edges, edges[1:], r["bucket_loss_sums"], r["bucket_recall_tokens"]):
            acc = position[r["model"]][a, b]
            acc[0] += loss
            acc[1] += b - a
            acc[2] += recall
    tasks = sorted({task for _, task in totals} - {"all"})
    rows = []
    for model in models:
        for task in tasks + (["all"] if len(tasks) > 1 else []):
            acc = totals.get((model, task))
            if not acc:
                continue
            n, m = max(acc["recall_tokens"], 1), max(acc["other_tokens"], 1)
            rows.append({"model": model, "task": task, "records": int(acc["records"]),
                         "recall_tokens": int(acc["recall_tokens"]), "recall_loss": acc["recall_loss_sum"] / n,
                         "recall_accuracy_%": 100 * acc["recall_hits"] / n,
                         "chance_%": 100 * acc["chance"] / n if acc.get("chance") is not None else float("nan"),
                         "other_loss": acc["other_loss_sum"] / m})
    pos_rows, lines = [], {}
    for model in models:
        for (a, b), (loss, tokens, recall) in sorted(position.get(model, {}).items()):
            pos_rows.append({"model": model, "position_start": a, "position_end": b, "loss": loss / tokens,
                             "recall_fraction": recall / tokens})
            lines.setdefault(model, []).append(((a + b) / 2, loss / tokens))
    write_csv(out / "recall.csv", rows)
    write_csv(out / "recall_loss_by_position.csv", pos_rows)
    if lines:
        _plot(out / "recall_loss_by_position.png", {"loss by token position": lines}, "position (tokens)", "loss",
              log2_x=False)
    return rows
