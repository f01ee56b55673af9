"""Checks of the evaluation settings (configs/eval/), each failure naming its key and the fix."""

from __future__ import annotations

from ttt_train.eval.ruler_suite import check_suite

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(cfg: dict, key: str, minimum: int = 1, where: str = "") -> None:
    if not _is_int(cfg[key]) or cfg[key] < minimum:
        raise ValueError(f"{where}{key}={cfg[key]!r}: an integer >= {minimum} is needed")


def check_config(cfg: dict) -> None:
    """Refuse bad values with a one-line error naming the key."""
    models = cfg["models"]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise ValueError("models: give a list of HF directories or checkpoints, e.g. models=[runs/a,runs/b]")
    if cfg["labels"] is not None and not (isinstance(cfg["labels"], list) and all(isinstance(x, str) for x in cfg["labels"])):
        raise ValueError("labels: give a list of names, one per model, e.g. labels=[ttt,base]")
    lengths = cfg["lengths"]
    if lengths is not None and not (isinstance(lengths, list) and lengths and all(_is_int(n) and n >= 0 for n in lengths)):
        raise ValueError(f"lengths={lengths!r}: give a list of token counts, e.g. lengths=[4096,8192], or null")
    for key in ("samples", "batch_size"):
        _positive_int(cfg, key)
    _positive_int(cfg, "seed", minimum=0)
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"dtype={cfg['dtype']!r}: choose from {', '.join(DTYPES)}")
    for key in ("lr", "max_update_norm"):
        value = cfg["ttt"][key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"ttt.{key}={value!r}: a positive number is needed, or null (the model's own)")
    suite = cfg["suite"]
    if suite["name"] == "ruler":
        if lengths is not None and min(lengths) < 1:
            raise ValueError("lengths: RULER lengths must be positive")
        check_suite(suite)
    elif suite["name"] == "sliding_ppl":
        if not isinstance(suite["dataset"], str):
            raise ValueError("suite.dataset: give the prefix of a data_tools dataset, e.g. suite.dataset=data/val")
        _positive_int(suite, "block", minimum=2, where="suite.")
        _positive_int(suite, "position_buckets", where="suite.")
        if suite["position_length"] is not None:
            _positive_int(suite, "position_length", minimum=2, where="suite.")
    elif suite["name"] == "recall":
        if not isinstance(suite["records"], str):
            raise ValueError("suite.records: give a JSON-lines file of data_tools.synthetic records, "
                             "e.g. suite.records=data/heldout.jsonl")
        _positive_int(suite, "position_width", where="suite.")
    else:
        raise ValueError(f"suite={suite['name']!r}: choose ruler, recall or sliding_ppl")


def result_settings(cfg: dict) -> dict:
    """What decides the result records: a restart must use the same (models, lengths and, for
    RULER, samples may change: records are per model, length and sample)."""
    settings = {"suite": cfg["suite"], "seed": cfg["seed"], "dtype": cfg["dtype"], "ttt": cfg["ttt"]}
    if cfg["suite"]["name"] == "sliding_ppl":  # the documents chosen depend on these
        settings.update(lengths=cfg["lengths"], samples=cfg["samples"])
    return settings
