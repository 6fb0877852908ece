"""Command line: `palikit VERB ...`, a map from verbs to plain functions.

Errors the user can fix (missing file, bad image, unknown task, wrong checkpoint) print one line
and exit with status 2; nothing prints a traceback unless PALIKIT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pathlib import Path

from .processor import InputError, load_image
from .weights import CheckpointError


def cmd_generate(args) -> None:
    import palikit

    pipe = palikit.load(args.model, dtype=args.dtype)
    images = args.image if len(args.image) > 1 else args.image[0]
    text, out = pipe.generate_details(images, args.prompt, max_new_tokens=args.max_new_tokens,
                                      do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                      num_beams=args.num_beams)[0]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "tokens": out.tokens,
                          "logprob": sum(out.logprobs)}, ensure_ascii=False))
    else:
        print(text)


def cmd_task(args) -> None:
    """caption / ask / ocr / detect / segment on one image; optional overlay PNG."""
    import palikit
    from palikit.tasks import draw

    pipe = palikit.load(args.model, dtype=args.dtype)
    image = load_image(args.image)
    if args.verb == "caption":
        result = pipe.caption(image, lang=args.lang, style=args.style)
    elif args.verb == "ask":
        result = pipe.ask(image, args.question, lang=args.lang)
    elif args.verb == "ocr":
        result = pipe.ocr(image)
    elif args.verb == "detect":
        result = pipe.detect(image, args.labels)
    else:
        result = pipe.segment(image, args.labels, codec=args.vae)
    if isinstance(result, str):
        print(json.dumps({"text": result}, ensure_ascii=False) if args.json else result)
        return
    if args.json:
        print(json.dumps([r.to_dict() for r in result], ensure_ascii=False))
    else:
        for r in result:
            score = f" ({r.score:.2f})" if r.score is not None else ""
            print(f"{r.label}: " + ", ".join(f"{v:.0f}" for v in r.box) + score)
        if not result:
            print("(nothing found)")
    if args.out:
        write_image_atomic(draw(image, result), args.out)


def write_image_atomic(image, path) -> None:
    from .weights import _atomic

    _atomic(Path(path), lambda p: image.save(p, format="PNG"))


def cmd_run(args) -> None:
    import palikit
    from palikit.batch import run_jobs

    pipe = palikit.load(args.model, dtype=args.dtype)
    stats = run_jobs(pipe, args.input, args.output, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, codec=args.vae)
    print(json.dumps(stats))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="folder, .npz, hub id, or 'default' (bundled tiny model)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palikit", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("generate", help="free-form generation from image(s) and a prompt")
    _model_args(p)
    p.add_argument("--image", required=True, action="append", help="image path (repeat for several images)")
    p.add_argument("--prompt", required=True, help='task prefix, e.g. "caption en"')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-beams", type=int, default=1)
    p.set_defaults(func=cmd_generate)

    for verb, help_text in [("caption", "caption an image"), ("ask", "answer a question about an image"),
                            ("ocr", "read the text in an image"), ("detect", "find objects: boxes"),
                            ("segment", "find objects: boxes and masks")]:
        p = verbs.add_parser(verb, help=help_text)
        p.add_argument("image")
        if verb == "ask":
            p.add_argument("question")
        if verb in ("detect", "segment"):
            p.add_argument("labels", nargs="+", help="object names")
        _model_args(p)
        if verb in ("caption", "ask"):
            p.add_argument("--lang", default="en")
        if verb == "caption":
            p.add_argument("--style", default="caption", choices=["cap", "caption", "describe"])
        if verb in ("detect", "segment"):
            p.add_argument("--out", help="write an overlay PNG with the boxes (and masks) here")
        if verb == "segment":
            p.add_argument("--vae", help="mask codec npz (big_vision vae-oid.npz); default: beside the model")
        p.set_defaults(func=cmd_task, out=None, vae=None)

    p = verbs.add_parser("run", help="batch jobs from a JSONL file (resumable)")
    _model_args(p)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--vae", help="mask codec npz for segment jobs")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="palikit: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (InputError, CheckpointError, FileNotFoundError, ValueError) as e:
        if os.environ.get("PALIKIT_DEBUG") == "1":
            raise
        print(f"palikit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
