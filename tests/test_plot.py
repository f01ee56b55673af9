"""`python -m ttt_train.plot RUN_DIR`: loss curves of metrics.jsonl as a PNG; a step logged twice keeps
its last record; a folder with nothing to plot is one line, exit 2."""

import json

from ttt_train import plot


def write_run(folder, records, torn=False):
    folder.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "metrics.jsonl").write_text(text + ('{"stage": 1, "st' if torn else ""))
    return folder


def records(offset=0.0):
    out = []
    for stage, name, steps in ((0, "ctx1k", 4), (1, "ctx4k", 3)):
        for step in range(1, steps + 1):
            run_step = step + (4 if stage else 0)
            out.append({"stage": stage, "stage_name": name, "step": step, "run_step": run_step,
                        "loss": 5.0 - 0.1 * run_step + offset, "lr": 1e-3})
        out.append({"stage": stage, "stage_name": name, "step": steps, "run_step": steps + (4 if stage else 0),
                    "val/loss": 4.0 + offset})
    return out


def test_plot_one_run_keeps_the_last_record_of_a_step(tmp_path, capsys):
    rerun = [{"stage": 1, "stage_name": "ctx4k", "step": 2, "run_step": 6, "loss": 1.25, "lr": 5e-4}]
    run = write_run(tmp_path / "run", records() + rerun, torn=True)
    curves = plot.read_curves(run)
    assert [s for s, _, _ in curves["train"]] == [1, 2, 3, 4, 5, 6, 7]
    assert dict((s, loss) for s, loss, _ in curves["train"])[6] == 1.25
    assert curves["val"] == [(4, 4.0), (7, 4.0)] and curves["stages"] == [(1, "ctx1k"), (5, "ctx4k")]
    assert plot.main([str(run)]) == 0
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "7 training and 2 validation points" in capsys.readouterr().out


def test_plot_compares_runs_and_names_what_is_missing(tmp_path, capsys):
    a, b = write_run(tmp_path / "ttt", records()), write_run(tmp_path / "base", records(0.2))
    assert plot.main([str(a), str(b), "--out", str(tmp_path / "cmp.png"), "--smooth", "2"]) == 0
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert plot.main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'}: no metrics.jsonl (is it a ttt_train.train run folder?)\n"
    empty = write_run(tmp_path / "empty", [])
    assert plot.main([str(empty)]) == 2 and "no loss records yet" in capsys.readouterr().err


def test_plot_another_validation_metric(tmp_path, capsys):
    rows = records() + [{"stage": 1, "stage_name": "ctx4k", "step": 3, "run_step": 7, "val/recall_loss": 0.5}]
    run = write_run(tmp_path / "run", rows)
    assert plot.read_curves(run, "val/recall_loss")["val"] == [(7, 0.5)]
    assert plot.main([str(run), "--validation", "val/recall_loss"]) == 0
    assert "7 training and 1 validation points" in capsys.readouterr().out
