"""The browser demo as a ModelScope studio or a Hugging Face Space runs it: ``python app.py``.

Serves the demo models shipped in ``model_cards/demo`` (``modelscope_plugin.apps.browser_demo``) on the address and
port the platform sets (``GRADIO_SERVER_NAME``, ``GRADIO_SERVER_PORT``), else on 127.0.0.1:7860, until stopped.
Needs this package with its ``[demo]`` extra (Gradio). ``modelscope-seg serve`` is the same app with options.
"""
import os

from modelscope_plugin.apps import browser_demo
from modelscope_plugin.apps.demo import REPOSITORY, shipped_demo_models

models = [str(directory) for directory, _ in shipped_demo_models().values()]
if not models:
    raise SystemExit(f"no trained demo model in {REPOSITORY / 'model_cards' / 'demo'}")
scenes, photos = browser_demo.example_images(browser_demo.SCENE_FOLDER, REPOSITORY.parent / "shared" / "data")
demo = browser_demo.build_app(browser_demo.load_pipelines(models, device="cpu"), scenes, photos)

if __name__ == "__main__":
    browser_demo.launch(demo, host=os.environ.get("GRADIO_SERVER_NAME", browser_demo.HOST),
                        port=int(os.environ.get("GRADIO_SERVER_PORT", browser_demo.PORT)))
    demo.block_thread()
