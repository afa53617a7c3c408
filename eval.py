"""Evaluate a trained run's checkpoint again: `python eval.py run_dir=runs/<date>/<run>`.

Options in mra_lra/conf/eval.yaml (`python eval.py --help`); the app is mra_lra/evaluate.py (also
`python -m mra_lra.evaluate` and the `mra-lra-eval` command).
"""

from mra_lra.evaluate import cli

if __name__ == "__main__":
    cli()
