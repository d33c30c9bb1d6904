"""``acert bench``: costs as ratios measured side by side (``run``), the timing helpers
(``timing``) and the printed table (``table``)."""
