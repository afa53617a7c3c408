"""LRALitModule's evaluation metrics against per-example values computed by hand."""

import pytest
import torch
from torch import nn

from mra_lra.models.module import LRALitModule


class FixedLogits(nn.Module):
    """A classifier whose logits are the batch's own `logits` entry."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["logits"]


@pytest.mark.parametrize("hook, split", [("validation_step", "val"), ("test_step", "test")])
def test_eval_loss_is_the_mean_over_examples_whatever_the_batches(hook, split):
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 3), torch.randint(0, 3, (16,))
    per_example = nn.functional.cross_entropy(logits.double(), labels, reduction="none")
    losses = {}
    for batch_size in (16, 5):  # 5: batches of 5, 5, 5 and a last one of 1
        module = LRALitModule(FixedLogits(), optimizer=None, scheduler=None, num_classes=3)
        module.log = lambda *args, **kwargs: None
        step = getattr(module, hook)
        for i, start in enumerate(range(0, 16, batch_size)):
            rows = slice(start, start + batch_size)
            step({"logits": logits[rows], "label": labels[rows]}, i)
        losses[batch_size] = getattr(module, f"{split}_loss").compute().item()
        assert getattr(module, f"{split}_acc").compute().item() == pytest.approx(
            (logits.argmax(-1) == labels).double().mean().item()
        )
    assert losses[16] == pytest.approx(per_example.mean().item(), rel=1e-6)
    assert losses[5] == pytest.approx(per_example.mean().item(), rel=1e-6)
