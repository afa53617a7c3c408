"""Task data: one datamodule per LRA task, the generators (ListOps, Pathfinder), and the cache of
preprocessed arrays they share (`cache.py`)."""
