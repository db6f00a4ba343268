"""lmms-eval plugin: the model ``tgvkv`` answers benchmark requests through the TGV-KV engine (`tgvkv.generate`).

    pip install -r requirements-lmms.txt
    LMMS_EVAL_PLUGINS=tgvkv.integrations.lmms_eval python -m lmms_eval --model tgvkv \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=tgv-kv,keep=0.05 --tasks textvqa_val --output_path logs/

Layout, as lmms-eval's plugin loader expects it (``<plugin>.models.AVAILABLE_MODELS`` maps a model name to a class
in the module ``<plugin>.models.<name>``; ``<plugin>.tasks`` must be a package, its folder is added to the task
search path):

- `adapter`: everything that does not need lmms-eval (typed model arguments, request -> engine inputs, traces);
- `models/tgvkv.py`: the thin `lmms` subclass registered as ``tgvkv``;
- `tasks/`: task YAMLs shipped with the plugin (none yet; the folder must exist).

Model arguments: see `adapter.PluginConfig`; docs/lmms-eval.md has the commands for the paper's table.
"""
