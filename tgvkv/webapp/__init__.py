"""The Gradio app's logic (layout lives in ../../app.py): plain handlers, a cached model loader, examples, exports."""
