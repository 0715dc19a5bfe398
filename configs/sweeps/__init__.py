"""Shipped sweep files: `python -m routing_lm.sweep --sweep=configs/sweeps/<name>.py`."""
