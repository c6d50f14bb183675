"""`softmoe eval`: top-1/top-5 accuracy on a split and few-shot linear probes (docs/design.md §5)."""
from __future__ import annotations

import argparse
import math


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="top-1/top-5 and few-shot linear-probe accuracy of a checkpoint",
        description="Evaluate a checkpoint: top-1/top-5 accuracy on a split and few-shot ridge-regression "
                    "probes on the pre-logits (docs/design.md §5: best accuracy over L2 in 2^-10..2^19).")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="training workdir (latest checkpoint), checkpoints/step_* dir, save_pretrained dir, or the "
                        "name of a shipped model (`softmoe models --pretrained`)")
    p.add_argument("--data", default=None, metavar="NAME",
                   help="dataset name or ImageFolder directory (default: the one recorded in the workdir)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="directory holding the dataset files")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fewshot", default="1,5,10,25", metavar="SHOTS",
                   help="comma-separated shots per class drawn from the train split, or 'none' (default: 1,5,10,25)")
    p.add_argument("--fewshot-seed", type=int, default=0, help="seed of the few-shot image selection")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on GPU (routing stays float32)")
    p.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.set_defaults(func=run)


def _l2(v: float) -> str:
    e = math.log2(v)
    return f"2^{int(e)}" if e == int(e) else f"{v:g}"


def _check_json_target(path: str) -> None:
    """--json checked before the evaluation: writable, and not some other file (a run's
    config.json, say) that the results would replace; an earlier result is replaced."""
    import json
    from pathlib import Path

    from softmoe._io import check_output_file

    check_output_file(path, "--json")
    if Path(path).is_file():
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            doc = None
        if not (isinstance(doc, dict) and {"checkpoint", "split", "num_test"} <= doc.keys()):
            raise ValueError(f"--json {path!r} exists and is not a `softmoe eval` result: not replacing it "
                             f"(delete it or choose another file)")


def run(args: argparse.Namespace) -> int:
    from softmoe._device import resolve_device
    from softmoe._io import atomic_write_json
    from softmoe.data import load_dataset
    from softmoe.eval.fewshot import parse_shots
    from softmoe.eval.loading import load_checkpoint, make_prepare, resolve_data
    from softmoe.eval.run import evaluate_model

    shots = parse_shots(args.fewshot)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device, arg="--device")
    if args.json:
        _check_json_target(args.json)  # before minutes of evaluation, not after
    model, train_cfg = load_checkpoint(args.checkpoint)
    data, root = resolve_data(args.data, args.data_root, train_cfg)
    test = load_dataset(data, args.split, root, args.download)
    train = load_dataset(data, "train", root, args.download) if shots else None
    if train is not None and train.classes != test.classes:
        raise ValueError(f"the train and {args.split} splits of {data!r} have different classes")
    model.to(device)
    result = evaluate_model(
        model, test.images, test.labels, len(test.classes),
        train_images=train.images if train is not None else None,
        train_labels=train.labels if train is not None else None,
        shots=shots, seed=args.fewshot_seed, batch_size=args.batch_size,
        prepare=make_prepare(model, test.channels), device=device, bf16=args.bf16, classes=test.classes)

    name = getattr(model.config, "name", type(model).__name__)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint {args.checkpoint}: model {name} ({n_params / 1e6:.2f}M params), "
          f"data {data}/{args.split}: {result['num_test']} images, {result['num_classes']} classes, "
          f"device {device}{' bf16' if args.bf16 and device.type == 'cuda' else ''}")
    rows = []
    if "top1" in result:
        rows.append(("top-1", f"{result['top1']:.4f}", ""))
    if "top5" in result:
        rows.append(("top-5", f"{result['top5']:.4f}", ""))
    for s, r in result.get("fewshot", {}).items():
        rows.append((f"{s}-shot", f"{r['accuracy']:.4f}",
                     f"best l2 {_l2(r['l2'])}, {r['num_train']} train images, {r['system']}"))
    w = max(len(r[0]) for r in rows) if rows else 6
    print(f"{'metric':<{w}}  accuracy  notes")
    for metric, acc, note in rows:
        print(f"{metric:<{w}}  {acc:>8}  {note}")
    if "note" in result:
        print(f"note: {result['note']}")
    print(f"({result['seconds']:.1f} s)")

    if args.json:
        out = {"checkpoint": str(args.checkpoint), "model": name, "num_params": n_params, "data": data,
               "data_root": root, "split": args.split, "device": str(device),
               "bf16": bool(args.bf16 and device.type == "cuda"), "fewshot_seed": args.fewshot_seed, **result}
        if "fewshot" in out:
            out["fewshot"] = {str(s): r for s, r in out["fewshot"].items()}
        atomic_write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0
