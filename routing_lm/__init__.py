"""routing_lm: routed (Mixture-of-Experts) language models and their scaling laws.

Subpackages import their own dependencies: `routing_lm.scaling` needs only
numpy/scipy/pandas/matplotlib, `routing_lm.data` alone loads TensorFlow (seqio).
"""
__version__ = "0.1.0"
