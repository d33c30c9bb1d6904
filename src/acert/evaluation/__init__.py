"""Clean, certified and PGD metrics of a model (``evaluate``), shared out among the processes of
a run (``sharded``)."""
