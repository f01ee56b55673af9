"""Data for training: tokenizers (`tokenizer`), document ids for TTT resets (`documents`), indexed
datasets on disk (`indexed`), training datasets and their resumable order (`datasets`), synthetic
long-context tasks (`synthetic`), and the errors of bad input (`errors`). Import the modules
directly; `indexed` and `datasets` import megatron-core, the others do not."""
