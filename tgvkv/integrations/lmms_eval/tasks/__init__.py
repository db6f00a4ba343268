"""Task YAMLs shipped with the plugin (none yet).

lmms-eval adds this package's folder to its task search path for every plugin named in ``LMMS_EVAL_PLUGINS`` and
fails when the package does not exist, so it stays even while empty. Local tasks of your own go anywhere and are
added with ``--include_path FOLDER`` (tests/test_lmms_eval.py writes one).
"""
