"""``python -m acert.config [PATH]``: rewrite the generated tables of docs/CONFIG.md (or PATH)."""

from __future__ import annotations

import sys

from acert.config.docs import write_docs

if __name__ == "__main__":
    print(f"written: {write_docs(*sys.argv[1:2])}")
