"""Training data on megatron-core: a validated config, GPTDataset / blended dataset building, and a
fixed, resumable, data-parallel batch order.

Batches are dicts of `[B, T]` tensors: `tokens`, `labels` (tokens shifted by one), `loss_mask`
(float), `position_ids`, and `doc_ids` (int64, see `documents.document_ids_from_tokens`: where the
TTT fast weights reset); a blend of several datasets adds `dataset_id` (`[B]`, the blend entry of
each sample). A training stage (e.g. the 32k then 128k curriculum) is one DataConfig;
they differ in `seq_length` and `blend`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping

import numpy
import torch

from ttt_train.config_keys import checked_mapping
from ttt_train.data import indexed
from ttt_train.data.documents import document_ids_from_tokens
from ttt_train.data.errors import DataError
from ttt_train.data.tokenizer import Tokenizer, check_model_vocab, load_tokenizer

with warnings.catch_warnings():  # importing megatron.core warns that TE/Apex are absent: expected here
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizerBase

_SPLIT = re.compile(r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*$")


@dataclasses.dataclass
class BlendEntry:
    """A dataset prefix (PREFIX.bin/.idx) and its sampling weight."""

    path: str
    weight: float = 1.0


@dataclasses.dataclass
class DataConfig:
    """The data of one training stage; validated on construction (errors name the key).

    blend: datasets and weights (samples are drawn in proportion to the weights).
    split: train,valid,test proportions of each dataset's documents, e.g. "98,1,1".
    seq_length: tokens per sample. seed: megatron's shuffling seed (fixes the sample order).
    cache_dir: where megatron writes its index caches, in a subfolder per `dataset_fingerprint`
    (rebuilding a dataset in place never reads stale indices). tokenizer / eod_token: see `load_tokenizer`.
    eod_mask_loss: no loss on the token after an EOD (the first token of the next document).
    reset_position_ids: position ids restart at 0 in every document.
    num_workers: DataLoader worker processes.
    """

    blend: list[BlendEntry]
    seq_length: int
    split: str = "98,1,1"
    seed: int = 1234
    cache_dir: str = "data_cache"
    tokenizer: str = "byte"
    eod_token: str | None = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    mid_level_dataset_surplus: float = 0.005
    num_workers: int = 0

    @classmethod
    def from_dict(cls, cfg: Mapping) -> DataConfig:
        """From a mapping or an OmegaConf node; `blend` entries are {path, weight} or a path."""
        cfg = checked_mapping(cls, cfg, "data")
        for key in ("blend", "seq_length"):
            if key not in cfg:
                raise ValueError(f"data config: missing key {key!r}")
        if not isinstance(cfg["blend"], list):
            raise ValueError(
                f"data config key 'blend': expected a list of {{path, weight}}, got {cfg['blend']!r}"
            )
        entries = []
        for i, entry in enumerate(cfg["blend"]):
            entry = {"path": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict) or "path" not in entry or set(entry) - {"path", "weight"}:
                raise ValueError(f"data config key 'blend[{i}]': expected {{path, weight}}, got {entry!r}")
            entries.append(BlendEntry(**entry))
        return cls(**{**cfg, "blend": entries})

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, problem: str) -> None:
            if not ok:
                raise ValueError(f"data config key {key!r}: {problem}")

        require(isinstance(self.blend, list) and len(self.blend) > 0, "blend", "needs at least one dataset")
        for i, entry in enumerate(self.blend):
            for suffix in (".bin", ".idx"):
                require(
                    os.path.isfile(entry.path + suffix), f"blend[{i}].path", f"{entry.path}{suffix} not found"
                )
            require(
                _number(entry.weight) and entry.weight > 0, f"blend[{i}].weight", f"not > 0: {entry.weight!r}"
            )
        for key, minimum in (("seq_length", 1), ("seed", 0), ("num_workers", 0)):
            value = getattr(self, key)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            require(ok, key, f"not an integer >= {minimum}: {value!r}")
        split_ok = (
            isinstance(self.split, str)
            and _SPLIT.match(self.split)
            and any(map(float, self.split.split(",")))
        )
        require(
            split_ok, "split", f"not up to three comma-separated proportions like '98,1,1': {self.split!r}"
        )
        for key in ("eod_mask_loss", "reset_position_ids"):
            require(isinstance(getattr(self, key), bool), key, f"not true or false: {getattr(self, key)!r}")
        require(
            isinstance(self.cache_dir, str) and self.cache_dir != "", "cache_dir", "must name a directory"
        )
        require(
            self.tokenizer == "byte" or os.path.exists(os.path.expanduser(self.tokenizer)),
            "tokenizer",
            f"{self.tokenizer} not found (expected 'byte', a tokenizer.json or a tokenizer directory)",
        )
        surplus = self.mid_level_dataset_surplus
        require(_number(surplus) and surplus >= 0, "mid_level_dataset_surplus", f"not >= 0: {surplus!r}")


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class MegatronTokenizerAdapter(MegatronTokenizerBase):
    """A `Tokenizer` as megatron's datasets use one: `vocab_size` (token dtype), `eod`, `pad` (masked
    out of the loss; absent when the tokenizer has none), and `unique_identifiers` (part of the key
    of megatron's index cache)."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer.name, {})
        self._tokenizer = tokenizer

    @property
    def unique_identifiers(self) -> dict[str, str]:
        return {
            "class": type(self).__name__,
            "tokenizer": self._tokenizer.name,
            "fingerprint": self._tokenizer.fingerprint,
        }

    def tokenize(self, text: str) -> numpy.ndarray:
        return numpy.asarray(self._tokenizer.encode(text), dtype=numpy.int64)

    def detokenize(self, ids: numpy.ndarray) -> str:
        return self._tokenizer.decode(ids)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.backend.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def eod(self) -> int:
        return self._tokenizer.eod_id

    @property
    def pad(self) -> int:
        if self._tokenizer.pad_id is None:
            raise NotImplementedError(f"tokenizer {self._tokenizer.name!r} has no pad token")
        return self._tokenizer.pad_id

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pretraining data has no chat template")


def dataset_fingerprint(cfg: DataConfig) -> str:
    """sha256 identifying the samples of `cfg`: each dataset's identity (`indexed.dataset_identity`:
    its content, not its path), the normalised weights, split, seq_length and seed. For the
    checkpoint manifest, and the key of the index cache folder."""
    total = sum(float(entry.weight) for entry in cfg.blend)
    split = [float(x) for x in cfg.split.split(",")]
    split += [0.0] * (3 - len(split))
    described = {
        "datasets": [[indexed.dataset_identity(e.path), float(e.weight) / total] for e in cfg.blend],
        "split": [x / sum(split) for x in split],
        "seq_length": cfg.seq_length,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def build_datasets(
    cfg: DataConfig,
    tokenizer: Tokenizer | None = None,
    num_samples: tuple[int, int, int] = (0, 0, 0),
    *,
    model_vocab_size: int | None = None,
) -> tuple[GPTDataset | None, ...]:
    """(train, valid, test) megatron datasets of at least `num_samples` samples each (None for a
    split with no share). Each dataset is first checked against the tokenizer (its fingerprint,
    vocab: largest id from the sidecar or one scan, EOD id, documents ending in EOD); given
    `model_vocab_size`, so is the tokenizer against the model (`check_model_vocab`): every token id
    then fits the model's embedding table. Call on every rank: with
    torch.distributed initialised, rank 0 builds the index caches in
    `cfg.cache_dir/<dataset_fingerprint>` first and the other ranks then read them.
    """
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer, cfg.eod_token)
    if model_vocab_size is not None:
        check_model_vocab(model_vocab_size, tokenizer)
    for entry in cfg.blend:
        indexed.check_against_tokenizer(entry.path, tokenizer, require_eod=True)
    prefixes = [entry.path for entry in cfg.blend]
    weights = [float(entry.weight) for entry in cfg.blend] if len(prefixes) > 1 else None
    # megatron-core 0.16.1's BlendedDataset asks torch.distributed for the rank on a cache miss even
    # when it is not initialised: a blend outside torch.distributed builds its indices in memory.
    cached = weights is None or torch.distributed.is_initialized()
    # megatron keys its cache by the dataset paths: a folder per data identity keeps a dataset
    # rebuilt in place from meeting the indices of its previous version.
    cache = os.path.join(cfg.cache_dir, dataset_fingerprint(cfg)[:20])
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=(prefixes, weights),
        split=cfg.split,
        path_to_cache=cache if cached else None,
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,  # [T, T] masks are unaffordable at long context; attention is causal
        mid_level_dataset_surplus=cfg.mid_level_dataset_surplus,
    )
    check_split_documents(cfg, config.split_matrix)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    return tuple(builder.build())


SPLIT_NAMES = ("train", "validation", "test")


def check_split_documents(cfg: DataConfig, split_matrix: list) -> None:
    """Refuse (DataError naming the dataset and the fix) a blend entry whose share of a split holds no
    document: megatron splits each dataset by documents (rounded) and builds every split with a share,
    asked for samples or not; an empty one makes it loop forever looking for samples."""
    for k, entry in enumerate(cfg.blend):
        documents = len(indexed.open_dataset(entry.path).sequence_lengths)
        for name, bounds in zip(SPLIT_NAMES, split_matrix):
            if bounds is None:
                continue
            if round(bounds[1] * documents) <= round(bounds[0] * documents):
                raise DataError(f"data.blend[{k}].path={entry.path}: its {documents} documents give the {name} "
                                f"split (data.split={cfg.split!r}: {100 * (bounds[1] - bounds[0]):.0f}%) no document; "
                                f"add documents or raise that share of data.split")


class ResumableBatchSampler(torch.utils.data.Sampler):
    """This data-parallel rank's micro-batches of sample indices, from `consumed_samples` on.

    The global order is 0, 1, 2, ... (megatron's datasets are already shuffled by seed). Each step
    takes the next `micro_batch_size * dp_size` indices and rank r gets the r-th slice of
    `micro_batch_size`, so ranks are disjoint. `consumed_samples` counts samples consumed by all
    ranks (what a checkpoint stores); resuming from it continues the same stream exactly.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        step = micro_batch_size * dp_size
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"bad micro_batch_size={micro_batch_size} / dp_rank={dp_rank} / dp_size={dp_size}"
            )
        if consumed_samples % step or not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a multiple of micro_batch_size * dp_size = {step} "
                f"and at most the {total_samples} samples"
            )
        self.total, self.consumed, self.micro, self.rank, self.step = (
            total_samples,
            consumed_samples,
            micro_batch_size,
            dp_rank,
            step,
        )

    def __len__(self) -> int:
        return (self.total - self.consumed) // self.step

    def __iter__(self):
        for start in range(self.consumed, self.total - self.step + 1, self.step):
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))


def collate_batch(samples: list[dict[str, torch.Tensor]], eod_id: int) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into `[B, T]` tensors and add `doc_ids`."""
    batch = torch.utils.data.default_collate(samples)
    batch["doc_ids"] = document_ids_from_tokens(batch["tokens"], eod_id)
    return batch


def build_dataloader(
    dataset,
    eod_id: int,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches of this rank in the fixed order, resuming after `consumed_samples` (all ranks)."""
    sampler = ResumableBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate_batch, eod_id=eod_id),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
