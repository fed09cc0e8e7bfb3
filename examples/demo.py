"""A web demo of a trained M2IST adapter: upload a photo (or pick an example), type a phrase, see its box.

    python examples/demo.py                                        # the README's main job's adapter, 127.0.0.1:7860
    python examples/demo.py --adapter my-adapter --port 8000       # another adapter
    python examples/demo.py --host 0.0.0.0                         # reachable from other machines

Built on Gradio and on the library's inference API (`peft_m2ist.inference`); runs on the CPU unless --device says
otherwise. The examples are scikit-image's sample photographs (shipped in its PyPI package) with phrases written for
them. Bad input (not an image, an empty phrase, a 1x1 image) is shown as a message in the page; the demo keeps
running.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import gradio as gr

from peft_m2ist.data.sample_photos import SAMPLE_PHOTOS
from peft_m2ist.data.visualize import draw_box
from peft_m2ist.inference import DEFAULT_ADAPTER, ReferringExpressionGrounder

TITLE = "M²IST: find the object a phrase names"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=DEFAULT_ADAPTER, help="Adapter folder (save_pretrained) or Hub id.")
    recorded = "the one the adapter records in its adapter_config.json (or an older adapter's towers.json)"
    p.add_argument("--vision_model", default=None, help=f"Vision tower (default: {recorded}).")
    p.add_argument("--text_model", default=None, help=f"Text tower (default: {recorded}).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: this machine only).")
    p.add_argument("--port", type=int, default=7860)
    return p.parse_args(argv)


def example_files(folder: Path) -> list[list[str]]:
    """The sample photographs written to ``folder`` as JPEGs, each with the first phrase of its first object."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo in SAMPLE_PHOTOS:
        path = folder / photo.file_name
        if not path.is_file():
            photo.image().save(path, quality=92)
        rows.append([str(path), photo.objects[0].phrases[0]])
    return rows


def build_demo(grounder: ReferringExpressionGrounder, examples_dir: Path) -> gr.Blocks:
    """The Gradio app: image + phrase in, the image with its box and the box's coordinates out."""

    def find(image, phrase):
        if image is None:
            raise gr.Error("Upload an image (or pick an example) first.")
        try:
            result = grounder(image, phrase)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        x0, y0, x1, y1 = (round(c, 1) for c in result.box)
        return draw_box(image, result.box), {"box_xyxy_pixels": [x0, y0, x1, y1],
                                             "box_xyxy_normalized": [round(c, 4) for c in result.box_normalized],
                                             "image_size": list(result.image_size), "phrase": result.phrase}

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nAdapter `{grounder.adapter}` on the towers `{grounder.towers['vision']}` + "
                    f"`{grounder.towers['text']}`. Boxes are `[x0, y0, x1, y1]` in the image's pixels.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", elem_id="input-image", image_mode="RGB")
                phrase = gr.Textbox(label="Phrase", placeholder="the cup of coffee", elem_id="phrase")
                button = gr.Button("Find it", variant="primary", elem_id="find")
            with gr.Column():
                output = gr.Image(type="pil", label="Box", elem_id="output-image")
                coordinates = gr.JSON(label="Coordinates", elem_id="coordinates")
        gr.Examples(example_files(examples_dir), inputs=[image, phrase])
        button.click(find, inputs=[image, phrase], outputs=[output, coordinates], api_name="ground")
        phrase.submit(find, inputs=[image, phrase], outputs=[output, coordinates])
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        grounder = ReferringExpressionGrounder.from_pretrained(
            args.adapter, vision_model=args.vision_model, text_model=args.text_model, device=args.device)
    except ValueError as err:
        sys.exit(f"demo: {err}")
    with tempfile.TemporaryDirectory(prefix="m2ist-demo-") as tmp:
        build_demo(grounder, Path(tmp)).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
