"""Evaluate a run's checkpoint again: `python eval.py run_dir=runs/<date>/<run>`.

Rebuilds the model and data from the run's config.yaml; options and overrides in
mra_lra/evaluate.py (`python eval.py --help`).
"""

import sys

from mra_lra.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
