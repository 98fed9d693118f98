"""A web page for a trained model (Gradio): `uv run app.py runs/demo`, then open http://127.0.0.1:7860."""

from cars.cli import launch

if __name__ == "__main__":
    launch("app")
