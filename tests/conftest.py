"""Test set-up. Triton kernels run under the interpreter unless a GPU run asks otherwise
(scripts/gpu_check.sh sets TRITON_INTERPRET=0); this must happen before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
