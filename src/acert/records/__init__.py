"""The records of runs: run folders and checkpoints (``runs``), epoch logs (``loggers``), the
study table (``study``), figures (``plots``, ``plot_labels``) and seeds (``seeds``). The run
configuration is its own package, :mod:`acert.config`."""
