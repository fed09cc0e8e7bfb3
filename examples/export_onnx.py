"""Export a trained M2IST adapter on its towers to ONNX, as a folder that onnxruntime runs without torch.

    pip install -e ".[onnx]"
    python examples/export_onnx.py --adapter outputs/m2ist-shapes/best_adapter --output outputs/m2ist-shapes/onnx
    python examples/onnx_predict.py --bundle outputs/m2ist-shapes/onnx --image photo.jpg --phrase "the red circle"

Writes ``model.onnx`` (inputs ``pixel_values``, ``pixel_mask``, ``input_ids``, ``attention_mask`` with a dynamic
batch; output ``pred_boxes``, cxcywh in [0, 1] of the padded canvas), the tokenizer and ``preprocessing.json``
(`peft_m2ist.export.export_adapter`). The towers are the ones the adapter records (``base_towers``), loaded in
float32, unless --vision_model / --text_model name others. Then onnxruntime runs the graph on the inputs it was
traced on and its boxes must equal torch's within --atol. A tower that cannot be exported stops the script with a
message naming the tower, its module and the operation. See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from peft_m2ist.export import OnnxExportError, export_adapter


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="outputs/m2ist-shapes/best_adapter",
                        help="an adapter folder (save_pretrained) or a Hub id (default: the README main job's)")
    parser.add_argument("--output", default=None, help="the bundle folder (default: <adapter>_onnx)")
    parser.add_argument("--vision_model", default=None)
    parser.add_argument("--text_model", default=None)
    parser.add_argument("--atol", type=float, default=1e-4, help="the largest difference allowed in the check")
    parser.add_argument("--no_check", action="store_true", help="skip the onnxruntime-against-torch check")
    args = parser.parse_args(argv)
    output = args.output or f"{args.adapter.rstrip('/')}_onnx"
    try:
        info = export_adapter(args.adapter, output, vision_model=args.vision_model, text_model=args.text_model,
                              check=not args.no_check, atol=args.atol)
    except (OnnxExportError, ValueError) as err:
        sys.exit(f"export_onnx.py: {err}")
    print(json.dumps(info, indent=2))
    checked = (f"; onnxruntime's boxes differ from torch's by at most {info['max_abs_difference']:.2g}"
               if "max_abs_difference" in info else "")
    print(f"wrote {output}/model.onnx, the tokenizer and preprocessing.json{checked}")
    return info


if __name__ == "__main__":
    main()
