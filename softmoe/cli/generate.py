"""`softmoe generate CHECKPOINT --prompt TEXT --tokens N`: sample from a char-level decoder
(softmoe/models/gpt.py) with the attention KV cache and the causal MoE layers' bounded state."""
from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a char-level decoder checkpoint",
                              description="Sample text from a decoder saved by `softmoe train --config charlm` "
                                          "(CHECKPOINT: its model/ folder or the run's work directory).")
    p.add_argument("checkpoint", help="a folder written by save_pretrained, or a work directory holding model/")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=200, help="characters (bytes) to sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from softmoe.lm.data import decode, encode
    from softmoe.models.gpt import from_pretrained

    if args.tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    from softmoe.models.hub import latest_checkpoint

    path = Path(args.checkpoint)
    if (path / "model").is_dir():  # a finished training work directory
        path = path / "model"
    elif path.is_dir() and latest_checkpoint(path) is not None:  # one still running, or killed
        path = latest_checkpoint(path)
    model = from_pretrained(path).eval()
    prompt = encode(args.prompt)
    if len(prompt) == 0:
        raise ValueError("--prompt must not be empty")
    prompt = prompt[-model.config.block_size:].unsqueeze(0)
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator().manual_seed(args.seed))
    sys.stdout.write(args.prompt + decode(out[0, prompt.shape[1]:]) + "\n")
    return 0
