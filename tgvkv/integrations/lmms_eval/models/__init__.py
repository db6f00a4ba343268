"""lmms-eval reads ``AVAILABLE_MODELS`` (model name -> class name); the class lives in ``models/<name>.py``.

Two ways to make lmms-eval 0.7.3 see the model:
- ``LMMS_EVAL_PLUGINS=tgvkv.integrations.lmms_eval`` (reads ``AVAILABLE_MODELS``; lmms-eval calls it deprecated);
- the entry point group ``lmms_eval.models`` of an installed package, pointing at `manifest`, e.g. in
  pyproject.toml: ``[project.entry-points."lmms_eval.models"] tgvkv = "tgvkv.integrations.lmms_eval.models:manifest"``.
"""

AVAILABLE_MODELS = {"tgvkv": "TGVKV"}


def manifest():
    """The entry-point payload: lmms-eval's ModelManifest for ``--model tgvkv`` (imports lmms-eval only when called)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tgvkv", simple_class_path=f"{__name__}.tgvkv.TGVKV")
