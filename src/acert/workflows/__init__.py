"""The workflows: what the command line runs on run folders (train, certify, sweep, export,
bench), one subpackage each. Imports nothing, so that a sweep job can load its launcher without
torch."""
