"""Evaluate a trained run's checkpoint again: `python eval.py run_dir=runs/<date>/<run>`.

Options in mra_lra/conf/eval.yaml (`python eval.py --help`); the code is mra_lra/evaluate.py.
"""

from mra_lra.evaluate import main

if __name__ == "__main__":
    main()
