"""The αβ-CROWN configuration that ``acert export`` writes beside instances.csv.

The keys are those of αβ-CROWN's ``complete_verifier/arguments.py`` (the release vendored in
CTRAIN 0.6.1); docs/VERIFIERS.md says how to run the file and read the results back.
"""

from __future__ import annotations

__all__ = ["ABCROWN_NAME", "RESULTS_NAME", "abcrown_config"]

ABCROWN_NAME = "abcrown.yaml"
"""File name of the configuration, in the benchmark root beside instances.csv."""
RESULTS_NAME = "abcrown_results.pkl"
"""Where the configuration tells αβ-CROWN to write its per-instance verdicts (a pickle)."""


def abcrown_config(instances_name: str, timeout: float, source: str) -> str:
    """The YAML text of an αβ-CROWN configuration that runs every row of ``instances_name``.

    Args:
        instances_name: the instances CSV's file name, in the same folder as the configuration.
        timeout: seconds per instance, the value in every row of that CSV.
        source: one line saying what was exported (written as a comment).
    """
    source = " ".join(source.split())  # one comment line, whatever the run folder is called
    return f"""\
# alpha-beta-CROWN configuration for {source}
# Written by acert export beside {instances_name}; see docs/VERIFIERS.md in acert.
# Run from alpha-beta-CROWN's complete_verifier folder:
#   python abcrown.py --config <this file>
general:
  device: cpu  # cuda to run on a GPU
  conv_mode: patches
  root_path: ${{CONFIG_PATH}}  # the folder of this file (the benchmark root)
  csv_name: {instances_name}  # rows: onnx path, vnnlib path, timeout (seconds)
  results_file: {RESULTS_NAME}  # a pickle, written in the folder abcrown.py runs from
solver:
  crown:
    # keep the tighter of CROWN's and IBP's intermediate bounds: on IBP-trained nets CROWN's
    # alone start looser than the bounds acert certified with
    compare_crown_with_ibp: true
bab:
  timeout: {timeout:g}  # each instances.csv row sets this again; both are the same
"""
