"""What every layer may use: user errors (``errors``), rule objects (``ranges``), the processes
of a run (``process_group``), thread settings (``threads``) and the ε schedule (``schedules``).
Imports nothing, so that ``threads`` can run before torch loads."""
