#!/usr/bin/env bash
# Retake the README's screenshot (docs/images/demo.png): the demo on a trained adapter, in headless Chromium, asked
# about a validation scene of the shapes benchmark and its own phrase (tests/test_demo.py takes the picture).
#   bash scripts/demo_screenshot.sh [ADAPTER]      ADAPTER defaults to the README main job's best adapter
# SCENE=N picks another validation scene (default 0); SCREENSHOT=FILE writes elsewhere than docs/images/demo.png.
# The demo is given the adapter by a path relative to the repository (or to the folder above the adapter's own), so
# the picture shows no folder of one machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ADAPTER=${1:-outputs/m2ist-shapes/best_adapter}
[ -d "$ADAPTER" ] || { echo "no adapter at $ADAPTER: run the README's main job first" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python - "$WORK/scene.png" "${SCENE:-0}" > "$WORK/phrase.txt" <<'PY'
import sys

from peft_m2ist.data import load_shapes_benchmark

sample = load_shapes_benchmark()["val"][int(sys.argv[2])]
image = sample["image"]  # 128 px: shown 3x larger, nearest neighbour, so the page is readable
image.resize((3 * image.width, 3 * image.height), resample=0).save(sys.argv[1])
print(sample["phrase"])
PY
M2IST_DEMO_ADAPTER="$ADAPTER" M2IST_DEMO_IMAGE="$WORK/scene.png" M2IST_DEMO_PHRASE="$(cat "$WORK/phrase.txt")" \
  M2IST_DEMO_SCREENSHOT="${SCREENSHOT:-docs/images/demo.png}" \
  .venv/bin/python -m pytest -q tests/test_demo.py -k real_browser -p no:cacheprovider
echo "wrote ${SCREENSHOT:-docs/images/demo.png} (phrase: $(cat "$WORK/phrase.txt"))"
