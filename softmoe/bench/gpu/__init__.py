"""GPU check: correctness in fp32/bf16/fp16, the layer benchmark, training img/s and a kill + resume, in minutes.

`softmoe bench gpu --out DIR` on a CUDA machine (about 8 minutes on one H100/H200) writes
gpu.json and gpu.md to DIR:
  (a) correctness: SoftMoE's fused and reference paths against a float64 reference, forward and
      gradients, in fp32 and under bf16 / fp16 autocast, with the tolerance of each dtype;
  (b) the layer benchmark (`softmoe bench layer` machinery: CUDA events, warm-up, medians) at
      B=32 and B=256 (N=196, D=384, H=1536, P=1, E=128 and 8) in fp32 and bf16, optionally
      compiled, against the PyPI ports when installed, with % of the bf16 / fp32 rooflines;
  (c) training img/s of soft_moe_s16 against vit_s16 in bf16, with the trainer's own step;
  (d) a short `softmoe train` run, killed after its first checkpoint and resumed.
Nothing is downloaded (data: scikit-learn's embedded digits; synthetic images for (c)).
`--smoke` (any device, CPU included) runs the same code on tiny shapes in seconds.
"""
# One job per file: correctness.py (a), speed.py (b, c), resume.py (d), command.py (options,
# budget, report).
from .command import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
