"""Bridges to other tools. Each subpackage imports its tool only inside itself, so `tgvkv` never needs them.

- `lmms_eval`: a model plugin for lmms-eval (``LMMS_EVAL_PLUGINS=tgvkv.integrations.lmms_eval``); docs/lmms-eval.md.
"""
