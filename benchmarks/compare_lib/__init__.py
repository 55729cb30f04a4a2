"""The parts of ``benchmarks/compare.py``: method and task settings (``config``), the per-rank
training loop (``worker``) and its torch and Keras front ends, the loopback bandwidth cap
(``bandwidth``), launching under horovodrun (``launch``), derived numbers, tables and plots
(``report``)."""
