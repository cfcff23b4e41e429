"""The lab around the library: memory estimates and presets, the profiler, ``bcd finetune``, the
command line, and the transformers and TensorBoard integrations (``pip install 'bcd[lab]'``).

Nothing in :mod:`bcd`'s core imports from here; ``import bcd`` loads none of it.
"""
