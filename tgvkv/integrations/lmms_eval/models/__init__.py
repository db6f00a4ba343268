"""lmms-eval reads ``AVAILABLE_MODELS`` (model name -> class name); the class lives in ``models/<name>.py``."""

AVAILABLE_MODELS = {"tgvkv": "TGVKV"}
