"""Train one LRA task with one attention: `python train.py task=listops attn=mra`.

Any config value can be overridden on the command line (README, "The command line"); the app is
`mra_lra.train` (also `python -m mra_lra.train` and the `mra-lra-train` command).
"""

from mra_lra.train import cli

if __name__ == "__main__":
    cli()
