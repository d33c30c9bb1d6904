"""``acert export``: the benchmark for an external verifier (``run``), the folded network
(``fold``), its ONNX graph (``onnx_graph``), the αβ-CROWN configuration (``abcrown``) and the
property settings (``settings``)."""
