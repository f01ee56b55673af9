"""Loss curves of training runs: `python -m ttt_train.plot RUN_DIR [RUN_DIR ...] [--out PNG]`.

Reads each run folder's `metrics.jsonl` (written by `ttt_train.train`) and draws, against the step
across stages (`run_step`), the training loss (each logged interval's mean) and the held-out
validation loss (or another validation metric: `--validation val/recall_loss`), with the stage
boundaries marked, and the learning rate below. A step logged twice
(a run resumed from an earlier checkpoint, or a stage trained again) keeps its last record. Several
runs (e.g. In-Place TTT and its baseline) share the axes. Writes RUN_DIR/loss.png (one run) or --out.
Exit code 0, or 2 with one line naming the folder when a run has nothing to plot.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

EXIT_REFUSED = 2


class PlotError(ValueError):
    """A run folder without loss records to plot."""


def read_curves(run_dir: Path, validation: str = "val/loss") -> dict:
    """{"train": [(run_step, loss, stage_name)], "val": [(run_step, value of `validation`)], "lr":
    [(run_step, lr)], "stages": [(first run_step, stage_name)]} of a run folder, sorted by step, last
    record of each step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (is it a ttt_train.train run folder?)")
    train, val = {}, {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # the last line, cut short by a crash
                continue
            raise PlotError(f"{path}:{number}: not a JSON record") from None
        key = (record.get("stage"), record.get("step"))
        if "loss" in record and "run_step" in record:
            train[key] = record
        if validation in record and "run_step" in record:
            val[key] = record
    if not train and not val:
        raise PlotError(f"{path}: no loss records yet")
    rows = sorted(train.values(), key=lambda r: r["run_step"])
    stages = {}
    for r in rows:
        stages.setdefault(r.get("stage_name", r.get("stage")), r["run_step"])
    return {"train": [(r["run_step"], r["loss"], r.get("stage_name", r.get("stage"))) for r in rows],
            "val": sorted((r["run_step"], r[validation]) for r in val.values()),
            "lr": [(r["run_step"], r["lr"]) for r in rows if "lr" in r],
            "stages": sorted((step, name) for name, step in stages.items())}


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (1: unchanged)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: dict[str, dict], out: Path, smooth: int = 1, validation: str = "val/loss") -> None:
    """Draw `runs` ({label: read_curves(...)}) into PNG `out` (written atomically)."""
    from matplotlib.figure import Figure  # slow to import: only here

    fig = Figure(figsize=(8, 6.4))
    fig.subplots_adjust(left=0.12, right=0.97, top=0.94, bottom=0.09, hspace=0.12)
    loss_ax, lr_ax = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    lr_ax.sharex(loss_ax)
    for i, (label, curves) in enumerate(runs.items()):
        color = f"C{i}"
        if curves["train"]:
            steps, losses, _ = zip(*curves["train"])
            loss_ax.plot(steps, _smooth(list(losses), smooth), color=color, label=f"{label} train", linewidth=1.2)
        if curves["val"]:
            steps, losses = zip(*curves["val"])
            loss_ax.plot(steps, losses, color=color, marker="o", linestyle="--", label=f"{label} {validation}")
        if curves["lr"]:
            steps, lrs = zip(*curves["lr"])
            lr_ax.plot(steps, lrs, color=color, label=label)
        for k, (step, name) in enumerate(curves["stages"] if i == 0 else []):
            for ax in (loss_ax, lr_ax) if k else ():
                ax.axvline(step, color="gray", linestyle=":", linewidth=1)
            loss_ax.annotate(str(name), (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                             textcoords="offset points", fontsize="small", color="gray")
    loss_ax.set(ylabel="loss", title=" vs ".join(runs) + (f" (train smoothed over {smooth} logs)" if smooth > 1 else ""))
    loss_ax.tick_params(labelbottom=False)
    loss_ax.legend(fontsize="small")
    lr_ax.set(xlabel="step (across stages)", ylabel="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out)


def _label(run_dir: Path) -> str:
    """The run's name from its config.yaml, else the folder's name."""
    config = run_dir / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        try:
            return str(OmegaConf.load(config).run.name or run_dir.name)
        except Exception:  # noqa: BLE001 - a label only
            pass
    return run_dir.name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m ttt_train.plot", description=first, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (run.dir of ttt_train.train)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/loss.png for one run)")
    parser.add_argument("--validation", default="val/loss", metavar="KEY",
                        help="the validation record to draw (default: val/loss; e.g. val/recall_loss)")
    parser.add_argument("--smooth", type=int, default=1, help="moving average of the training loss over this many "
                                                              "logged points (default: 1, none)")
    args = parser.parse_args(argv)
    if args.out is None and len(args.runs) > 1:
        parser.error("several runs: name the PNG with --out")
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or args.runs[0] / "loss.png"
    try:
        runs = {}
        for run_dir in args.runs:
            label = _label(run_dir)
            runs[label if label not in runs else str(run_dir)] = read_curves(run_dir, args.validation)
        plot_runs(runs, out, args.smooth, args.validation)
    except (PlotError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    points = ", ".join(f"{label}: {len(c['train'])} training and {len(c['val'])} validation points"
                       for label, c in runs.items())
    print(f"wrote {out} ({points})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
