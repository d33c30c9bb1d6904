"""``python -m acert.workflows.sweep.point SPEC``: one point of a sweep that runs its points as
jobs.

SPEC is the JSON the sweep wrote (:func:`acert.workflows.sweep.run.point_spec`): the point's
resolved config (its ``threads`` the job's share of the cores), run folder, grid values, bounds and
subset size. The job trains, resumes or skips the point as the sweep itself would, then certifies
it. Its lines go to standard output (the point's ``sweep.log``); a user error is one
``acert: error:`` line and exit status 2, which the sweep reports.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from acert.foundation.threads import quiet_waiting


def _say(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_waiting()  # before torch loads OpenMP
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(
            "usage: python -m acert.workflows.sweep.point SPEC (written by acert sweep)",
            file=sys.stderr,
        )
        return 2
    from acert.foundation.errors import AcertError
    from acert.workflows.sweep.run import run_point

    try:
        run_point(args[0], log=_say)
    except AcertError as err:
        print(f"acert: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
