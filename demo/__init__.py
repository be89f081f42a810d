"""The Gradio demo, installed as ``toolkit.demo`` (see app.py)."""
