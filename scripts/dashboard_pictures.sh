#!/usr/bin/env bash
# The README's dashboard pictures from a real run: `make dashboard-pictures` (docs/dashboards.md).
#   RUN   the run folder (default runs/dashboard_demo; trained with the demo and both loggers
#         unless it already holds results.json)
#   OUT   where the PNGs go (default docs/img)
# Needs tensorboard (in .[dev]) and a headless Chromium (Debian: apt-get install chromium).
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/dashboard_demo}
OUT=${OUT:-docs/img}
PORT=${PORT:-6123}
mkdir -p "$OUT"

if [[ ! -f $RUN/results.json ]]; then
    WANDB_MODE=${WANDB_MODE:-offline} "$PYTHON" train.py experiment=demo "logger=[wandb,tensorboard]" \
        hydra.run.dir="$RUN" "$@"
fi

# The last of each picture (block maps, accuracy by length, confusion matrix), as TensorBoard
# holds it: <tag with / as _>.png.
"$PYTHON" - "$RUN/tensorboard" "$OUT" <<'EOF'
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(sys.argv[1], size_guidance={"images": 0})
events.Reload()
for tag in sorted(events.Tags()["images"]):
    last = events.Images(tag)[-1]
    path = Path(sys.argv[2]) / f"{tag.replace('/', '_')}.png"
    path.write_bytes(last.encoded_image_string)
    print(f"{tag} at step {last.step} -> {path}")
EOF

# TensorBoard: the Time Series tab (block maps; headless Chromium leaves its WebGL line charts
# blank) and the Scalars tab (MRA's values and the accuracies), filtered to what the README shows.
"$PYTHON" -m tensorboard.main --logdir "$RUN/tensorboard" --port "$PORT" --host 127.0.0.1 \
    >/dev/null 2>&1 &
BOARD=$!
trap 'kill $BOARD' EXIT
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break
    sleep 1
done
CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
shoot() {
    "$CHROME" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$2" \
        --virtual-time-budget=20000 --screenshot="$OUT/$1" "http://127.0.0.1:$PORT/$3" 2>/dev/null
    echo "TensorBoard -> $OUT/$1"
}
shoot tensorboard_demo.png 1400,760 "?tagFilter=mra%2Fblocks#timeseries"
shoot tensorboard_scalars.png 1400,1000 "#scalars&tagFilter=mra%7Cval%2Facc%7Ctest%2Facc"
