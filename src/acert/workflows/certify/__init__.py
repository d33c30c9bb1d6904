"""``acert certify`` on a run folder (``runs``); ``acert.certify`` is the Python API."""
