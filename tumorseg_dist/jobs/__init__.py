"""What each command does once its flags are parsed: train, evaluate, predict, export.

The commands themselves (tumorseg_dist/train.py, evaluate.py, ...) are one screen each: the
docstring, the flags (config.py, options.py) and a `main` that imports its job only after the
flags are good, so `--help` and a bad flag answer without importing torch.
"""
