"""The shipped configs, installed with the package as `routing_lm.configs`.

Load them by path: `routing_lm.config.load("configs/tiny.py:hash,8")`, or
`--config=configs/tiny.py:hash,8` on the command line; a `configs/...` path that is not
in the working directory is read from the installed copy.
"""
