"""The Gradio app's logic, outside the library: `app.py` (the launcher) calls `ui.build_ui`; the handlers are plain
functions split by job (`inputs`, `state`, `display`, `views`, `comparison`, `handlers`), plus a cached model loader,
examples, exports and the lesson tab.

Imported only by the app, its scripts and tests: `tgvkv` never imports it, and `import analysis` does not load it
(it needs gradio and torch).
"""
