"""The LRA backbone (plain nn.Module) and the LightningModule that trains it."""
