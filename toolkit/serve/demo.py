"""The Gradio demo: draw or upload a digit (MNIST tab) or upload any picture (Pictures tab: CIFAR,
Fashion-MNIST or any other dataset's export, with its own preparation and class names), pick an
exported artifact, see the top classes, the runtime and the latency.

Started by `toolkit serve [EXPORT_DIR ...]` (from a checkout, `python demo/app.py [EXPORT_DIR ...]` starts
it too). The logic (decoding, MNIST-style
preprocessing, runners) is in ``toolkit.inference.preprocess`` and ``toolkit.inference.catalog``; this file is only the layout.

API: the endpoint ``/predict`` takes an image file and, optionally, an artifact name
("<export>/<file>", default: the fastest artifact that passed its gate, else the newest fp32 model) and
returns the label output: ``Client(url).predict(handle_file("digit.png"), api_name="/predict")``.
"""

from __future__ import annotations

import gradio as gr

from toolkit.core.errors import ToolkitError
from toolkit.inference.catalog import CIFAR_FAMILY, MNIST_FAMILY, Catalog

INTRO = """# toolkit demo
Models exported by `toolkit export`, run by ONNX Runtime (or TensorRT where it runs), with the
accuracy parity each artifact proved against its trained model. Drawings are turned into MNIST's
format (white on black, scaled to 20 px, centred by mass in 28x28) before the model sees them; pictures
are prepared as each model's dataset was (resized, or for Fashion-MNIST grey, light on black, fitted)."""


BLANK_DRAWING = ("nothing was drawn: pick the brush (the pen button above the canvas) first, then draw the digit "
                 "large and dark, and press Classify drawing")
# a small upload (a 28x28 digit) fills its box, enlarged pixel for pixel, instead of showing as a thumbnail
CSS = (".toolkit-upload img { width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated; }"
       # the dropdown's arrow sits over the right end of its text box: keep the text out from under it, and
       # end a label too long for the box with an ellipsis rather than behind the arrow
       " .toolkit-choice input { padding-right: 2.25em !important; text-overflow: ellipsis; }")
SKETCH_HINT = "Pick the brush (the pen button), then draw one digit"


def build_demo(catalog: Catalog, examples: list[str], top_k: int = 3) -> gr.Blocks:
    def run(image, key):
        try:
            return catalog.classify(image, key or None, top_k=top_k)
        except ToolkitError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def classify(image, key):
        pred = run(image, key)
        # what the model was given, enlarged 5x with square pixels so it can be seen
        seen = pred.pixels.repeat(5, axis=0).repeat(5, axis=1)
        return pred.top, pred.summary(), seen

    def classify_sketch(editor, key):
        composite = editor.get("composite") if isinstance(editor, dict) else editor
        if composite is None:
            raise gr.Error(BLANK_DRAWING, print_exception=False)
        try:
            return classify(composite, key)
        except gr.Error as exc:
            if "blank" in str(exc.message):  # the usual cause: drawing before the brush was picked draws nothing
                raise gr.Error(BLANK_DRAWING, print_exception=False) from None
            raise

    def predict(image, artifact):
        """The public API: an image file and an optional artifact name -> the label output."""
        return run(image, artifact).top

    with gr.Blocks(title="toolkit demo") as demo:
        gr.Markdown(INTRO)
        with gr.Tab("MNIST"):
            _tab(catalog, MNIST_FAMILY, classify, classify_sketch, examples, top_k)
        with gr.Tab("Pictures"):
            _tab(catalog, CIFAR_FAMILY, classify, None, [], top_k)
        # the API endpoint: its own hidden components, so that the file reaches toolkit's decoder
        # untouched (size, mode and decompression limits are checked there) and errors come back
        # as toolkit's one-line messages
        with gr.Row(visible=False):
            api_image = gr.File(label="image", file_types=None)
            api_key = gr.Textbox(label="artifact", value="")
            api_label = gr.Label(label="prediction", num_top_classes=top_k)
            api_button = gr.Button("predict")
        api_button.click(predict, [api_image, api_key], api_label, api_name="predict")
    return demo


def _tab(catalog: Catalog, family_name: str, classify, classify_sketch, examples: list[str], top_k: int) -> None:
    keys = catalog.keys(family_name)
    if not keys:
        what = "an MNIST recipe" if family_name == MNIST_FAMILY else "a CIFAR or Fashion-MNIST recipe, or one of your own image folder"
        gr.Markdown(f"No {'MNIST' if family_name == MNIST_FAMILY else 'picture'} export is being served. Train "
            f"and export {what} (`toolkit recipes` lists them), "
                    "then restart `toolkit serve` with its export folder.")
        return
    _, height, width = catalog.entries[keys[0]].manifest.chw
    # full width, above both columns: an artifact's label (run, file, runtime, parity) is long
    choice = gr.Dropdown(choices=[(catalog.entries[k].label, k) for k in keys], value=keys[0], label="Model / artifact",
                         elem_id=f"{family_name}-choice", elem_classes=["toolkit-choice"])
    with gr.Row():
        with gr.Column():
            if classify_sketch is not None:
                with gr.Tab("Draw"):
                    sketch = gr.Sketchpad(
                        type="numpy", image_mode="RGBA", canvas_size=(300, 300), label="Draw a digit", placeholder=SKETCH_HINT,
                        brush=gr.Brush(default_size=16, colors=["#000000"], color_mode="fixed"), elem_id=f"{family_name}-sketch",
                    )
                    sketch_button = gr.Button("Classify drawing", variant="primary", elem_id=f"{family_name}-classify-drawing")
            with gr.Tab("Upload"):
                upload = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], elem_id=f"{family_name}-upload",
                                  elem_classes=["toolkit-upload"], height=300)
                upload_button = gr.Button("Classify image", variant="primary", elem_id=f"{family_name}-classify")
            if examples:  # below both tabs: visible while drawing too; a click classifies the example at once
                with gr.Column(elem_id=f"{family_name}-examples"):
                    gr.Examples(examples, inputs=upload, label="Real MNIST test digits (click one to classify it)")
        with gr.Column():
            label = gr.Label(num_top_classes=top_k, label="Top classes", elem_id=f"{family_name}-label")
            info = gr.Markdown(elem_id=f"{family_name}-info")
            seen = gr.Image(label=f"What the model sees ({width}x{height}, enlarged)", interactive=False, height=180)
    outputs = [label, info, seen]
    upload_button.click(classify, [upload, choice], outputs, api_visibility="private")

    def on_change(image, artifact):
        # an upload or an example's click sets the image; clearing it classifies nothing
        if not image:
            return gr.skip(), gr.skip(), gr.skip()
        return classify(image, artifact)

    upload.change(on_change, [upload, choice], outputs, api_visibility="private")
    if classify_sketch is not None:
        sketch_button.click(classify_sketch, [sketch, choice], outputs, api_visibility="private")
