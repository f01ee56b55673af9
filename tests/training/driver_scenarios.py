"""Driver runs inside `run_local_ranks` (one process per rank, gloo), with a probe patched in."""

from __future__ import annotations


def inner_lrs_seen(overrides: list[str]) -> tuple[int, list[tuple[int, float]]]:
    """(exit code, [(id of the TTT layer's W_down, lr passed to the TTT op)] in call order)."""
    from ttt_train import train
    from ttt_train.layers import ttt_mlp

    seen = []
    original = ttt_mlp.inplace_ttt

    def recording(z, v, weight, **kwargs):
        seen.append((id(weight), kwargs["lr"]))
        return original(z, v, weight, **kwargs)

    ttt_mlp.inplace_ttt = recording
    try:
        return train.main(overrides), seen
    finally:
        ttt_mlp.inplace_ttt = original


def nan_after(overrides: list[str], good_calls: int) -> int:
    """Exit code of a run whose model output turns NaN after `good_calls` micro-batches."""
    from ttt_train import train
    from ttt_train.training import step

    original = step.forward_step
    calls = [0]

    def poisoned(data_iterator, model, **kwargs):
        output, loss_func = original(data_iterator, model, **kwargs)
        calls[0] += 1
        return (output * float("nan") if calls[0] > good_calls else output), loss_func

    step.forward_step = poisoned
    try:
        return train.main(overrides)
    finally:
        step.forward_step = original


def run_driver(overrides: list[str]) -> int:
    from ttt_train import train

    return train.main(overrides)


def run_driver_captured(overrides: list[str]) -> tuple[int, str]:
    """(exit code, what the driver wrote to stderr)."""
    import contextlib
    import io

    from ttt_train import train

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(overrides)
    return code, err.getvalue()


def run_driver_printed(overrides: list[str]) -> tuple[int, str]:
    """(exit code, what the driver printed to stdout)."""
    import contextlib
    import io

    from ttt_train import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train.main(overrides)
    return code, out.getvalue()


def setup_raises(overrides: list[str], kind: str) -> tuple[int, str]:
    """(exit code, stderr) of a run whose dataset set-up raises: kind "data" an expected DataError (bad
    data), "bug" an unexpected TypeError (propagates)."""
    from ttt_train.data import datasets
    from ttt_train.data.errors import DataError

    def broken(*args, **kwargs):
        if kind == "data":
            raise DataError("dataset 'x': a problem found while setting up\nwith a second line")
        raise TypeError("a bug")

    datasets.build_datasets = broken
    return run_driver_captured(overrides)
