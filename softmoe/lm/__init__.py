"""Character-level language modelling with the decoder zoo (softmoe/models/gpt.py): corpus
loading and splits (data.py), bits per character two ways (bpc.py), the training loop
(train.py) that `softmoe train` runs for a config with `task="lm"`."""
from .bpc import bpc_prefix_only, bpc_teacher_forced, window_bits_prefix_only, window_bits_teacher_forced
from .data import CharCorpus, load_corpus

__all__ = ["CharCorpus", "load_corpus", "bpc_teacher_forced", "bpc_prefix_only", "window_bits_teacher_forced",
           "window_bits_prefix_only"]
