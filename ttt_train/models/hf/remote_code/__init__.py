"""Self-contained transformers code of In-Place TTT models (torch + transformers only, no ttt_train import).

Exported HF directories carry ``configuration_inplace_ttt.py`` and ``modeling_inplace_ttt.py`` beside
``config.json`` (see :func:`ttt_train.models.hf.remote_files.write_remote_code`), so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` runs In-Place TTT.
"""
