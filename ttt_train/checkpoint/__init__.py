"""Atomic, resharding, self-describing checkpoints with megatron's dist_checkpointing.

Layout of a checkpoint root:

    root/
      iter_0000100/                 one complete checkpoint
        ... megatron shards ...     (dist_checkpointing torch_dist format)
        rank_states/rank_00000.pt   optional per-rank state (RNG, data position), one file per rank
        ttt_meta.json               step, metadata, manifest, tensor keys (written last)
      latest                        text file: name of the most recently saved checkpoint

A save writes everything into `iter_XXXXXXX.tmp-<nonce>` and renames it into place only when
every rank has finished. A re-save of an existing step first renames the old folder aside
(`iter_XXXXXXX.old-<nonce>`), renames the new one in, updates `latest`, then deletes the old
one, so a crash at any point leaves a loadable checkpoint: `latest_checkpoint` falls back to the
aside copy when a crash fell between the two renames. Leftover `*.tmp-*` / `*.old-*` folders of
crashed saves are removed by the next successful save.

The manifest (`build_manifest`) records the model, TTT and parallel configuration, the dtype and
the tokenizer / data fingerprints. Loading works at any other TP/PP/DP layout (dist_checkpointing
reshards), refuses missing, unexpected and mis-shaped tensors by name, and with `expect_manifest`
refuses a checkpoint of another model or TTT configuration.

Optimizer state: the plain optimizer resumes bit-exactly on the same layout and loads at another
TP/PP/DP layout. The distributed optimizer is saved in megatron's `fully_reshardable` format
(gathered per parameter on DP rank 0 at save time; loadable at any TP/PP/DP layout, unlike
`dp_reshardable`; 0.16.1's `fully_sharded_model_space` fails at save with "flattened_range is not
supported"). Without Apex or transformer-engine (torch's Adam, e.g. on a CPU) megatron-core 0.16.1
cannot load distributed-optimizer state (see `sharded.refuse_unsupported_resume` and
shared/notes/megatron_cpu.md): use the plain optimizer there.

Every file's size and crc32 are recorded in ttt_meta.json; a load verifies them first, and a
resume falls back to the newest intact checkpoint (`recovery`). A save that fails on any rank (a
full disk) raises CheckpointSaveError on every rank and publishes nothing.

Modules: `format` (the folder layout, `latest`, reading a checkpoint's description), `manifest`
(what it was trained with), `integrity` (file sizes and checksums), `recovery` (the checkpoint to
resume from), `sharded` (every call into megatron's dist_checkpointing), `save`, `load`, `ranks`
(the collectives they need). This package sits below `models` and `training`: HF conversion and the training driver
both use it.
"""

from ttt_train.checkpoint.format import LATEST, META, checkpoint_name, latest_checkpoint, read_checkpoint_info
from ttt_train.checkpoint.integrity import CheckpointDamaged
from ttt_train.checkpoint.load import load_checkpoint, load_rank_state
from ttt_train.checkpoint.manifest import build_manifest, manifest_differences, tokenizer_manifest
from ttt_train.checkpoint.recovery import newest_intact, recover_latest
from ttt_train.checkpoint.save import CheckpointSaveError, save_checkpoint

__all__ = ["LATEST", "META", "CheckpointDamaged", "CheckpointSaveError", "build_manifest", "checkpoint_name",
           "latest_checkpoint", "load_checkpoint", "load_rank_state", "manifest_differences", "newest_intact",
           "read_checkpoint_info", "recover_latest", "save_checkpoint", "tokenizer_manifest"]
