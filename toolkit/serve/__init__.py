"""The serving stage: the Gradio demo and v2 API server, the v2 protocol, and predict."""
