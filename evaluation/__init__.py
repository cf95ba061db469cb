"""The consecutive-editing benchmark: datasets (cases), the methods compared, the run loop (harness), inference
speed, and ``kbsync eval`` (cli). The metrics themselves live beside the editor (editor/metrics.py).

Imports editor, kb (the fact dialects) and the daemon core (to load the configured model); nothing imports it
but ``kbsync eval`` and the benchmarks.
"""
