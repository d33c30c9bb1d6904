"""A training run from a config: the run (``run``), its one training loop (``loop``), the state
a resume restores (``state``) and the loss wrapped for several processes (``ddp``)."""
