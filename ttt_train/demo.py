"""`make demo`: train In-Place TTT and its sliding-window baseline from scratch, export, evaluate, compare.

    python -m ttt_train.demo [key=value ...]     (overrides of configs/demo/demo.yaml)

A thin orchestrator: it prints (`$ ...`) and runs, as subprocesses, the commands a user would type,
all taken from configs/demo/demo.yaml:
1. `python -m data_tools.synthetic ...` for each dataset or held-out records file not yet written;
2. `torchrun --nproc-per-node N -m ttt_train.train experiment=E run.dir=OUT/E ...` for each run
   (a finished run says so and exits 0; an interrupted one resumes);
3. `python -m ttt_train.convert export --checkpoint ... --out OUT/hf/E` from each run's final
   checkpoint (skipped when OUT/hf/E was exported from that same checkpoint);
4. `python -m ttt_train.eval models=[...] labels=[...] out=OUT/eval/NAME ...` for each evaluation;
then prints one table (final held-out loss per stage, loss and recall on the held-out documents'
recall tokens per evaluation, training tokens/s, per run), computed from the runs' metrics.jsonl and
the evaluations' CSV files, the verdict (the first run against the second, on `targets`), writes
both to OUT/summary.md and says where the plots, checkpoints, exports and wandb offline runs are.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from ttt_train.training.preemption import EXIT_PREEMPTED

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"


class CommandFailed(RuntimeError):
    pass


def compose(overrides: list[str]) -> dict:
    """configs/demo/demo.yaml with `overrides`, as plain containers (a key it lacks is refused, `+` or
    not, except new entries of `runs` and `eval`)."""
    from omegaconf import OmegaConf

    from ttt_train.config_compose import compose_yaml

    return OmegaConf.to_container(compose_yaml(CONFIG_DIR, "demo", overrides, open_keys=("runs", "eval")),
                                  resolve=True)


def run(shown: list[str], argv: list[str]) -> None:
    """Print `shown` (the command as a user types it) and run `argv` (the same in this interpreter)."""
    print(f"$ {shlex.join(shown)}", flush=True)
    code = subprocess.call(argv)
    if code == EXIT_PREEMPTED:
        raise CommandFailed(f"saved and stopped early (exit code {code}) in: {shlex.join(shown)}; rerun to continue")
    if code != 0:
        raise CommandFailed(f"exit code {code} from: {shlex.join(shown)}")


def python_module(module: str, args: list[str]) -> None:
    run(["python", "-m", module, *args], [sys.executable, "-m", module, *args])


def torchrun(nproc: int, module: str, args: list[str]) -> None:
    launcher = ["--nproc-per-node", str(nproc), "-m", module, *args]
    run(["torchrun", *launcher], [sys.executable, "-m", "torch.distributed.run", *launcher])


def make_data(item: dict) -> None:
    """`data_tools.synthetic` for one `data` entry: a dataset (`prefix`) or a records file (`output`)."""
    if "prefix" in item:
        flag, target, present = "--output-prefix", item["prefix"], Path(f"{item['prefix']}.idx")
    else:
        flag, target, present = "--output", item["output"], Path(item["output"])
    if present.is_file():
        print(f"# {target}: present")
        return
    python_module("data_tools.synthetic", [*map(str, item["args"]), flag, target])


def final_checkpoint(run_dir: Path) -> tuple[Path, Path]:
    """The last stage's checkpoint root of a finished run and the iter_* folder its `latest` names."""
    from ttt_train.checkpoint import latest_checkpoint

    roots = sorted((run_dir / "stages").glob("*/checkpoints"))
    path = latest_checkpoint(roots[-1]) if roots else None
    if path is None:
        raise CommandFailed(f"{run_dir}: no final checkpoint under {run_dir / 'stages'}")
    return roots[-1], path.resolve()


def export(root: Path, checkpoint: Path, hf_dir: Path) -> bool:
    """Export the checkpoint root `root` (whose latest is `checkpoint`) to `hf_dir` unless it was
    exported from `checkpoint` already; True if exported now."""
    marker = hf_dir.with_name(hf_dir.name + ".source")
    if (hf_dir / "config.json").is_file() and marker.is_file() and marker.read_text() == str(checkpoint):
        print(f"# {hf_dir}: exported from {checkpoint} already")
        return False
    shutil.rmtree(hf_dir, ignore_errors=True)
    python_module("ttt_train.convert", ["export", "--checkpoint", str(root), "--out", str(hf_dir)])
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(str(checkpoint))
    os.replace(tmp, marker)
    return True


def stage_metrics(metrics_file: Path) -> dict[str, dict]:
    """Per stage name (in stage order): the last held-out loss, the last training loss and the median
    training tokens/s over the logged intervals (the last record of each step wins on a resume)."""
    by_step: dict[tuple, dict] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        kind = "val" if "val/loss" in record else "train" if "tokens_per_s" in record else None
        if kind:
            by_step[kind, record["stage"], record["step"]] = record
    stages: dict[int, dict] = {}
    for (kind, stage, _), record in sorted(by_step.items(), key=lambda item: item[0][1:]):
        entry = stages.setdefault(stage, {"name": record["stage_name"], "speeds": []})
        if kind == "val":
            entry["val_loss"] = record["val/loss"]
        else:
            entry["train_loss"] = record["loss"]
            entry["speeds"].append(record["tokens_per_s"])
    return {e["name"]: {"val_loss": e.get("val_loss"), "train_loss": e.get("train_loss"),
                        "tokens_per_s": statistics.median(e["speeds"]) if e["speeds"] else None}
            for _, e in sorted(stages.items())}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summarise(metrics: dict[str, dict], recall: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """One row per run label, and per label and evaluation the all-task recall figures the verdict
    compares (`recall`: evaluation name -> its recall.csv rows)."""
    rows, scores = [], {}
    for label, stages in metrics.items():
        row: dict[str, str] = {"run": label}
        for name, m in stages.items():
            loss = m["val_loss"] if m["val_loss"] is not None else m["train_loss"]
            row[f"{name} loss{'' if m['val_loss'] is not None else ' (train)'}"] = _fmt(loss, 3)
        scores[label] = {}
        for evaluation, table_rows in recall.items():
            mine = [r for r in table_rows if r["model"] == label]
            overall = next((r for r in mine if r["task"] == "all"), mine[0] if len(mine) == 1 else None)
            if overall is None:
                continue
            figures = {k: float(overall[k]) for k in ("recall_loss", "recall_accuracy_%", "chance_%")}
            scores[label][evaluation] = figures
            row[f"{evaluation} recall loss"] = _fmt(figures["recall_loss"], 3)
            row[f"{evaluation} recall"] = f"{figures['recall_accuracy_%']:.0f}%"
        for name, m in stages.items():
            row[f"{name} tok/s"] = _fmt(m["tokens_per_s"], 0)
        rows.append(row)
    return rows, scores


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [columns] + [[row.get(c, "-") for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def verdict(scores: dict, ttt: str, base: str, targets: dict) -> str:
    """What the measurements say, TTT against the baseline on every evaluation (computed, never
    assumed): the recall-token loss ratio, TTT's recall, the baseline's recall over chance."""
    parts, met = [], {}
    for evaluation, t in scores[ttt].items():
        b = scores[base].get(evaluation)
        if b is None:
            continue
        ratio = t["recall_loss"] / b["recall_loss"]
        over = b["recall_accuracy_%"] - b["chance_%"]
        met[evaluation] = [ratio <= targets["loss_ratio"], t["recall_accuracy_%"] >= targets["recall_min"],
                           not over > targets["baseline_over_chance"]]  # nan (chance unknown) does not fail it
        chance = f", chance {b['chance_%']:.0f}%" if b["chance_%"] == b["chance_%"] else ""
        parts.append(f"{evaluation}: recall-token loss {t['recall_loss']:.3f} vs {b['recall_loss']:.3f} "
                     f"({100 * ratio:.0f}%), recall {t['recall_accuracy_%']:.0f}% vs {b['recall_accuracy_%']:.0f}%"
                     f"{chance}")
    if not parts:
        return f"no evaluation holds both {ttt} and {base}: nothing to compare."
    if all(all(checks) for checks in met.values()):
        head = f"{ttt} beats {base}, every target met"
    elif not any(any(checks[:2]) for checks in met.values()):  # neither TTT-side target anywhere
        head = f"{ttt} does not beat {base} at this scale"
    else:
        head = f"{ttt} meets " + ", ".join(
            f"{'every target' if all(checks) else f'{sum(checks)} of {len(checks)} targets'} on {evaluation}"
            for evaluation, checks in met.items())
    bar = (f"targets: loss <= {100 * targets['loss_ratio']:.0f}% of {base}'s, recall >= {targets['recall_min']:.0f}%, "
           f"{base} within {targets['baseline_over_chance']:.0f} points of chance")
    return f"{head} ({bar}): " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from ttt_train.cli_help import config_help, wants_help

    if wants_help(argv):
        print(config_help(__doc__, CONFIG_DIR / "demo.yaml"))
        return 0
    from ttt_train.config_keys import ConfigError

    try:
        cfg = compose(argv)
    except ConfigError as err:
        print(f"demo: {err} (configs/demo/demo.yaml)", file=sys.stderr)
        return 2
    out = Path(cfg["out"])
    labels = list(cfg["runs"])
    try:
        for item in cfg["data"]:
            make_data(item)
        for run_cfg in cfg["runs"].values():
            experiment = run_cfg["experiment"]
            torchrun(cfg["nproc_per_node"], "ttt_train.train", [f"experiment={experiment}", f"run.dir={out / experiment}",
                                                               *cfg["train_overrides"], *run_cfg["overrides"]])
        experiments = [r["experiment"] for r in cfg["runs"].values()]
        exported = [export(*final_checkpoint(out / e), out / "hf" / e) for e in experiments]
        if any(exported):  # results of the previous models would be reused by the resumable eval
            shutil.rmtree(out / "eval", ignore_errors=True)
        models = ",".join(str(out / "hf" / e) for e in experiments)
        for name, args in cfg["eval"].items():
            python_module("ttt_train.eval", [f"models=[{models}]", f"labels=[{','.join(labels)}]",
                                             f"out={out / 'eval' / name}", *args])
    except CommandFailed as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    report(cfg, out, labels)
    return 0


def report(cfg: dict, out: Path, labels: list[str]) -> None:
    """Print the table and where everything is; write it to OUT/summary.md."""
    experiments = {label: r["experiment"] for label, r in cfg["runs"].items()}
    metrics = {label: stage_metrics(out / e / "metrics.jsonl") for label, e in experiments.items()}
    evals = out / "eval"
    recall = {name: read_csv(evals / name / "recall.csv") for name in cfg["eval"]
              if (evals / name / "recall.csv").is_file()}
    rows, scores = summarise(metrics, recall)
    lines = [table(rows), ""]
    if len(labels) >= 2:
        lines.append(verdict(scores, labels[0], labels[1], cfg["targets"]))
    lines += [
        "",
        "loss: held-out validation loss at each stage's end (train: the last logged training loss); "
        "<eval> recall loss / recall: on the held-out documents of each evaluation, the loss (nats per token) "
        "and the argmax accuracy on exactly the tokens only a memory of the document predicts (queried values, "
        "pass keys, the copied string; per task in OUT/eval/<eval>/recall.csv); tok/s: median training "
        "throughput over the logged intervals, all ranks together.",
        "",
        "where everything is:",
        *[f"  {label}: run folder {out / e} (config.yaml, metrics.jsonl, stages/*/checkpoints), "
          f"HF export {out / 'hf' / e}" for label, e in experiments.items()],
        *[f"  plots: {p}" for p in sorted(evals.glob("*/*.png"))],
        *[f"  wandb offline run: wandb sync {p}" for e in experiments.values()
          for p in sorted((out / e / "wandb").glob("offline-run-*"))],
    ]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    tmp = out / "summary.md.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, out / "summary.md")
    print(f"\nsummary written to {out / 'summary.md'}")


if __name__ == "__main__":
    sys.exit(main())
