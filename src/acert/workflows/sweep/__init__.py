"""``acert sweep``: one run per grid point (``run``), the points as processes or cluster jobs
(``jobs``) and one point's job (``point``). Imports nothing: submitit unpickles from ``jobs``,
which imports no torch."""
