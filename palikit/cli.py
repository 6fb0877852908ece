"""palikit: run, fine-tune, evaluate and serve Google's PaliGemma vision-language models.

`palikit VERB ...`: each verb a plain function over the Python API. Arguments are checked as the
server checks requests (ranges, non-empty prompts) before any model loads.

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

from . import tasks
from .options import QUANT_SCHEMES, Options, ServerSettings, add_flags, from_flags
from .processor import InputError, load_image
from .video import NUM_FRAMES, STRIDE, Video, is_video_path
from .weights import CheckpointError


def load_model(args, **changes):
    """palikit.load with the options of the verb's flags (_model_args), `changes` applied."""
    import palikit

    return palikit.load(args.model, from_flags(args, Options, **changes))


def cmd_generate(args) -> None:
    pipe = load_model(args)
    text, out = pipe.generate_details([args.image], [args.prompt], max_new_tokens=args.max_new_tokens,
                                      do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                      num_beams=args.num_beams, **frame_flags(args))[0]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "tokens": out.tokens, "logprob": sum(out.logprobs),
                          "finish_reason": out.finish_reason}
                         | ({"frame_times": out.frame_times} if out.frame_times else {}), ensure_ascii=False))
    else:
        print(text)


def cmd_task(args) -> None:
    """A verb of tasks.TASKS on one image: its text, or its objects (and an optional overlay PNG)."""
    from palikit.overlay import draw

    spec = tasks.TASKS[args.verb]
    pipe = load_model(args)
    values = {a.name: getattr(args, a.name) for a in spec.args}
    if spec.masks and args.vae is None and pipe.codec_path is None:
        raise InputError(f"{spec.verb} needs the mask codec: pass --vae PATH (big_vision's vae-oid.npz); "
                         "the model folder has no mask_codec.npz or vae-oid.npz")
    budget = args.max_new_tokens or spec.budget(spec.build(**values))
    if is_video_path(args.image):  # its frames, once the prompt is known to fit them
        sampled = frame_flags(args)
        pipe.prompt_ids(spec.build(**values), sampled["frames"], budget)
        image = pipe.read_video(args.image, **sampled)
    else:
        image = load_image(args.image)
    options = {"codec": args.vae} if spec.masks else {}
    result = pipe.run_task(spec.verb, image, max_new_tokens=budget, **values, **options)
    times = {"frame_times": image.times} if isinstance(image, Video) else {}
    if isinstance(result, str):
        print(json.dumps({"text": result} | times, ensure_ascii=False) if args.json else result)
        return
    if isinstance(image, Video):  # boxes in the frames' pixels (the model's input size); overlays on the first
        image = image.frames[0]
    if args.json:
        print(json.dumps([r.to_dict() for r in result], ensure_ascii=False))  # (a video's times: generate --json)
    else:
        for r in result:
            shown = f" ({r.confidence:.2f})" if r.confidence is not None else ""
            print(f"{r.label}: " + ", ".join(f"{v:.0f}" for v in r.box) + shown)
        if not result:
            print("(nothing found)")
    if args.out:
        write_image_atomic(draw(image, result), args.out)


def cmd_export(args) -> None:
    try:
        from palikit.export import export
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        raise InputError(f"export needs the onnx extra ({e.name} is not installed): pip install 'palikit[onnx]'") from None
    pipe = load_model(args, dtype="float32", quantize=None)  # --quantize is the graphs', not the model's
    print(export(pipe, args.out, force=args.force, quantize=args.quantize))


def add_frame_flags(p: argparse.ArgumentParser) -> None:
    """How a clip given as the image is sampled (palikit.video.read_video)."""
    p.add_argument("--frames", type=POSITIVE, default=NUM_FRAMES, help=f"a video's frames (default {NUM_FRAMES})")
    p.add_argument("--stride", type=POSITIVE, default=STRIDE, help=f"every STRIDE-th frame from the first, as "
                   f"big_vision samples (default {STRIDE})")
    p.add_argument("--uniform", action="store_true", help="spread the frames evenly over the whole clip instead")


def frame_flags(args) -> dict:
    return {"frames": args.frames, "stride": None if args.uniform else args.stride}


def write_image_atomic(image, path) -> None:
    from .atomic import atomic_write

    atomic_write(path, lambda p: image.save(p, format="PNG"))


def cmd_run(args) -> None:
    from palikit.dist import all_sum, init_distributed, leave
    from palikit.jobs import run_jobs

    rank, world, device = init_distributed(args.device)  # one process unless started by torchrun
    named, merged = adapter_flags(args)
    args.adapter = merged
    pipe = load_model(args, device=str(device))
    for name, folder in named:
        pipe.load_adapter(name, folder, max_adapters=len(named))
    stats = run_jobs(pipe, args.input, args.output, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, codec=args.vae, rank=rank, world=world)
    stats["answered"], stats["errors"] = map(int, all_sum(stats["answered"], stats["errors"]))  # every rank's
    leave()
    if rank == 0:
        print(json.dumps(stats))


def cmd_train(args) -> None:
    from .finetune import train

    overrides = args.overrides + (["allow_data_errors=true"] if args.allow_data_errors else [])
    result = train(args.config, overrides, resume=args.resume, smoke=args.smoke)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the result
        print(json.dumps(result))


def cmd_quantize(args) -> None:
    from .quantize import save_quantized_folder

    os.environ["PALIKIT_QUANTIZE_ANYWAY"] = "1"  # it writes a folder, for this CPU or another: no decoding here
    pipe = load_model(args, quantize=args.to)
    save_quantized_folder(pipe, args.out)
    print(args.out)


def cmd_merge(args) -> None:
    from .finetune import merge

    print(merge(args.base, args.adapter, args.out, dtype=args.dtype, force=args.force))


def cmd_data_check(args) -> int:
    from .data import check_dataset

    if args.config is not None:
        return _check_config_data(args)
    if args.file is None:
        raise InputError("name the data to check, or --config CONFIG.yaml")
    config, tokenizer = _check_model(args.model, args.tokenizer)
    report = check_dataset(args.file, config=config, tokenizer=tokenizer,
                           max_text_len=args.max_text_len, split=args.split, open_images=args.open_images,
                           task=args.task, codec=args.vae, image_dir=args.image_dir, columns=args.columns)
    print(json.dumps(report.to_dict(), ensure_ascii=False) if args.json else report.format())
    return 0 if report.ok else 1  # warnings alone pass


def _check_config_data(args) -> int:
    """`palikit data check --config`: the config's train_file and eval_file, each as the trainer
    reads it (its split, task, codec, columns), lengths against its model and max_text_len."""
    from .data import check_dataset
    from .finetune.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise InputError(str(e)) from None
    model = cfg.model if isinstance(cfg.model, str) else (cfg.model.get("preset") or cfg.model.get("source"))
    try:
        config, tokenizer = _check_model(args.model or model, args.tokenizer)
    except (CheckpointError, InputError, OSError) as e:  # a hub model not downloaded here
        print(f"palikit data check: lengths not checked ({e})", file=sys.stderr)
        config, tokenizer = None, None
    ok = True
    for split, spec in [("train", cfg.train_file), ("valid", cfg.eval_file)]:
        if spec is None or spec.path is None:  # none, or generated (synthetic): nothing to check
            continue
        report = check_dataset(spec.path, config=config, tokenizer=tokenizer, max_text_len=cfg.max_text_len,
                               split=spec.split or split, open_images=args.open_images, task=spec.task,
                               codec=spec.codec, columns=spec.columns)
        print(json.dumps(report.to_dict(), ensure_ascii=False) if args.json else report.format())
        ok &= report.ok
    return 0 if ok else 1


def _check_model(config, tokenizer):
    """data check's --model (a preset or a folder, whose tokenizer.model is used) -> (config, tokenizer)."""
    from .config import PRESETS, PaliGemmaConfig
    from .weights import resolve_source

    if config is not None and config not in PRESETS:  # a model as every verb's --model names it
        folder = resolve_source(config)
        if not (folder / "config.json").is_file():
            raise InputError(f"{config}: --model takes a preset name or a model folder with config.json")
        if tokenizer is None and (folder / "tokenizer.model").exists():
            tokenizer = folder / "tokenizer.model"
        config = PaliGemmaConfig.from_file(folder / "config.json")
    return config, tokenizer


ERRORS_WARNED = 0.05  # `palikit eval` warns when more than this fraction of the examples failed


def cmd_eval(args) -> None:
    from palikit.dist import init_distributed, leave
    from palikit.eval_sets import BENCHMARKS
    from palikit.evaluate import evaluate, load_examples, markdown, write_report

    if args.list_benchmarks:
        for b in BENCHMARKS.values():
            print(f"{b.name:14} {b.metric:23} {b.split:17} {b.prompt!r:24} {b.layout}")
        return
    if args.report and not args.out:
        raise InputError("--report needs --out PREDS.jsonl (the predictions it is computed from)")
    rank, world, device = init_distributed(args.device)  # one process unless started by torchrun
    name, examples = load_examples(args.benchmark, args.data, args.split, args.limit,
                                   {"n_images": args.synthetic, "seed": args.seed, "size": args.size},
                                   task=args.task, codec=args.vae, columns=args.columns)
    pipe = load_model(args, device=str(device))
    bench = BENCHMARKS.get(name)
    rep = evaluate(pipe, examples, name=name, bench_metric=bench.metric if bench else None,
                   metric=args.metric, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   codec=args.vae, out=args.out, rank=rank, world=world, model=args.model, split=args.split,
                   by_task=bench is None or bench.name == "synthetic", seed=args.seed, force_new=args.force_new)
    leave()
    if rank != 0:
        return
    if args.out:
        write_report(rep, args.report or Path(args.out).with_suffix(".report.json"))
    print(json.dumps(rep, indent=2, ensure_ascii=False) if args.json else markdown(rep), end="")
    failed, total = rep["errors"], rep["examples"]
    if failed == total:
        raise InputError(f"every example failed ({failed}); the first: {rep['first_error']}")
    if failed > ERRORS_WARNED * total:
        print(f"WARNING: {failed} of {total} examples failed (scored as wrong answers); the first: "
              f"{rep['first_error']}", file=sys.stderr)


def cmd_demo(args) -> None:
    """Every task on a generated shapes image (or --image), printed, plus an overlay PNG."""
    import numpy as np

    from palikit.synthetic import KINDS, make_scene, trained_prompts_text
    from palikit.overlay import draw

    pipe = load_model(args)
    if args.image:
        image = load_image(args.image)
    else:
        image = make_scene(np.random.default_rng(args.seed), number_prob=1.0).image  # the world's 96 px
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_image_atomic(image, out / "input.png")
    print(f"model: {pipe.config.name} ({args.model}); image: {args.image or out / 'input.png'}")
    if args.model == "default":
        print(f"the bundled model knows {trained_prompts_text()}")
    caption = pipe.caption(image)
    print("caption en".ljust(40) + f"-> {caption}")
    # Ask about the kinds the caption names, one kind per detect/segment prompt as in training.
    kinds = sorted((k for k in KINDS if k in caption), key=caption.index) or ["circle", "square"]
    for kind in kinds:
        print(f"answer en how many {kind}s?".ljust(40) + f"-> {pipe.ask(image, f'how many {kind}s?')}")
    for kind in [k for k in kinds if caption.count(k) == 1][:1]:  # "the X" needs exactly one X
        print(f"answer en what colour is the {kind}?".ljust(40) + f"-> {pipe.ask(image, f'what colour is the {kind}?')}")
    print("ocr".ljust(40) + f"-> {pipe.ocr(image)}")
    dets, segs = [], []
    for kind in kinds:
        found = pipe.detect(image, [kind])
        print(f"detect {kind}".ljust(40) + "->", [(d.label, [round(v) for v in d.box]) for d in found] or "(nothing)")
        dets += found
    for kind in kinds if pipe.codec_path else []:
        found = pipe.segment(image, kind)
        shown = [(m.label, [round(v) for v in m.box], f"{int(m.mask.sum())} mask px") for m in found]
        print(f"segment {kind}".ljust(40) + "->", shown or "(nothing)")
        segs += found
    write_image_atomic(draw(image, [*dets, *segs]), out / "overlay.png")
    print(f"overlay with boxes and masks: {out / 'overlay.png'}")


def cmd_serve(args) -> None:
    try:
        from palikit.serve import serve
    except ImportError as e:
        raise InputError(f"serving needs the server extra ({e.name} is not installed): "
                         "pip install 'palikit[serve]'") from None

    named, merged = adapter_flags(args, with_dir=False)  # the server reads --adapters-dir itself
    settings = from_flags(args, ServerSettings, api_key=args.api_key or os.environ.get("PALIKIT_API_KEY"),
                          adapters=tuple(f"{n}={d}" for n, d in named))
    serve(args.model, from_flags(args, Options, adapter=merged), settings)


def add_adapter_flags(p: argparse.ArgumentParser, dir_flag: bool) -> None:
    """--adapter NAME=DIR (repeatable; a bare DIR: merged, Options.adapter) and --adapters-dir."""
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter requests / jobs choose by NAME, repeatable; a bare DIR is merged into the "
                        "model instead")
    if dir_flag:
        p.add_argument("--adapters-dir", help="every adapter folder in this folder, named by its folder")


def adapter_flags(args, with_dir: bool = True) -> tuple[list[tuple[str, str]], str | None]:
    """([(name, folder)] chosen per request, the one folder merged at load or None)."""
    named = [tuple(a.split("=", 1)) for a in args.adapter if "=" in a]
    merged = [a for a in args.adapter if "=" not in a]
    if len(merged) > 1:
        raise InputError("--adapter DIR (merged into the model) is given once; several are --adapter NAME=DIR")
    if with_dir and getattr(args, "adapters_dir", None):
        named += sorted((p.name, str(p)) for p in Path(args.adapters_dir).iterdir() if p.is_dir())
    return named, merged[0] if merged else None


def _model_args(p: argparse.ArgumentParser, json_output: bool = True, skip: tuple[str, ...] = (), **defaults) -> None:
    p.add_argument("--model", default="default", help="folder, .npz, hub id, or 'default' (bundled tiny model)")
    add_flags(p, Options, skip, **defaults)
    if json_output:
        p.add_argument("--json", action="store_true", help="print one JSON object")


def json_object(text: str) -> dict:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object, e.g. '{\"image\": \"img\"}'")
    return value


def number(kind: type, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type: `kind` in [low, high] ((low, high] when `above`), with the server's ranges."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if low is not None and (value < low or (above and value == low)) or high is not None and value > high:
            where = f"{'>' if above else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {where}")
        return value
    return parse


def text(value: str) -> str:
    """An argparse type: a non-empty string."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


POSITIVE = number(int, 1)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="palikit", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("generate", help="free-form generation from image(s) and a prompt")
    _model_args(p)
    p.add_argument("--image", required=True, action="append", help="image path (repeat for several images)")
    p.add_argument("--prompt", required=True, type=text, help='task prefix, e.g. "caption en"')
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    p.add_argument("--temperature", type=number(float, 0, 2), default=0.0, help="0 = greedy; at most 2")
    p.add_argument("--top-k", type=number(int, 0), default=0, help="0 = off")
    p.add_argument("--top-p", type=number(float, 0, 1, above=True), default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-beams", type=POSITIVE, default=1)
    add_frame_flags(p)
    p.set_defaults(func=cmd_generate)

    for spec in tasks.TASKS.values():  # one verb per task
        p = verbs.add_parser(spec.verb, help=spec.help)
        p.add_argument("image", help="an image, or a clip (.mp4, .webm, .mov, .mkv, .avi: --frames, --stride)")
        add_frame_flags(p)
        for arg in spec.args:
            name = arg.name if arg.required else "--" + arg.name.replace("_", "-")
            kwargs = {"nargs": "+", "type": text} if arg.many else {"type": text}
            if not arg.required:
                kwargs.update(default=arg.default, dest=arg.name)
            p.add_argument(name, choices=arg.choices, help=arg.text.help or arg.text.title, **kwargs)
        _model_args(p)
        p.add_argument("--max-new-tokens", type=POSITIVE, default=None, help=spec.budget_help())
        if spec.parse is not None:
            p.add_argument("--out", help="write an overlay PNG with the boxes (and masks) here")
        if spec.masks:
            p.add_argument("--vae", help="mask codec npz (big_vision vae-oid.npz); default: beside the model")
        p.set_defaults(func=cmd_task, out=None, vae=None)

    from .jobs import JOB_FORMAT

    p = verbs.add_parser("run", help="batch jobs from a JSONL file (resumable)", epilog=JOB_FORMAT,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p, json_output=False, skip=("adapter",))  # it prints its statistics as JSON
    add_adapter_flags(p, dir_flag=True)
    p.add_argument("--input", required=True, help="the jobs, one JSON object per line (below)")
    p.add_argument("--output", required=True, help="the records, one per input line, in order; a rerun "
                                                   "continues it")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="rows decoded together")
    p.add_argument("--max-new-tokens", type=POSITIVE, help="a job's budget unless it sets its own (default: "
                   f"its task's, {tasks.FREE_PROMPT_BUDGET} for a free prompt)")
    p.add_argument("--vae", help="mask codec npz for segment jobs")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("demo", help="run every task on a generated image with the bundled model")
    _model_args(p, json_output=False, dtype="float32")
    p.add_argument("--image", help="your own image instead of a generated one")
    p.add_argument("--seed", type=int, default=1, help="which generated scene (1: two kinds and a number)")
    p.add_argument("--out", default="demo_out")
    p.set_defaults(func=cmd_demo)

    p = verbs.add_parser("eval", help="score a checkpoint on a model-card benchmark or a .jsonl file (also "
                                      "under torchrun)")
    _model_args(p)
    p.add_argument("--benchmark", help="a benchmark of the model card (see --list-benchmarks), or synthetic "
                                       "(the default without --data)")
    p.add_argument("--data", help="the benchmark's files; or what `palikit train` reads: a .jsonl file "
                                  "(image, prefix, suffix), COCO .json, a Roboflow / maestro or Hugging Face "
                                  "dataset folder (its --split, default valid)")
    p.add_argument("--task", default="detect", choices=["detect", "segment"],
                   help="--data COCO: score its annotations as detect or segment examples")
    p.add_argument("--columns", type=json_object, help='--data a Hugging Face dataset: its columns, as the '
                   'train config\'s, e.g. \'{"image": "img", "prefix": "answer en {question}", "suffix": "answer"}\'')
    p.add_argument("--split", help="the benchmark's split (default: the one the model card reports)")
    p.add_argument("--metric", help="score every example with this metric (default: the benchmark's, or "
                                    "by task word)")
    p.add_argument("--limit", type=POSITIVE, help="the first N examples only")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--max-new-tokens", type=POSITIVE, help="default: the task's budget")
    p.add_argument("--vae", help="mask codec npz for segment examples (default: beside the model)")
    p.add_argument("--out", help="predictions, one JSON line per example; a killed run resumes from it")
    p.add_argument("--report", help="the JSON report (and a .md table beside it); default: beside --out")
    p.add_argument("--force-new", action="store_true", help="start --out again although it holds predictions "
                                                                "made otherwise (another model, dtype, examples)")
    p.add_argument("--list-benchmarks", action="store_true", help="print the benchmarks and exit")
    p.add_argument("--synthetic", type=POSITIVE, default=200, help="--benchmark synthetic: generated images")
    p.add_argument("--seed", type=int, default=12345, help="--benchmark synthetic: a seed not used for training")
    p.add_argument("--size", type=number(int, 32), default=96, help="--benchmark synthetic: image side in pixels")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("train", help="fine-tune from a YAML config (also under torchrun)")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in out_dir, or from this checkpoint folder")
    p.add_argument("--smoke", action="store_true", help="a few steps on a few examples")
    p.add_argument("--allow-data-errors", action="store_true", help="train although `palikit data check` "
                                                                    "finds errors in the data")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("quantize", help="write an int8 / int4 / w8a8 model folder that loads without quantising again")
    p.add_argument("model", help="folder, .npz, hub id, or 'default'")
    p.add_argument("--to", required=True, choices=QUANT_SCHEMES)
    p.add_argument("--out", required=True)
    add_flags(p, Options, skip=("quantize", "compile", "attention", "logit_softcap", "sliding_window"))
    p.set_defaults(func=cmd_quantize)

    p = verbs.add_parser("merge", help="merge LoRA adapters into their base model")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_merge)

    p = verbs.add_parser("data", help="data set tools")
    data_verbs = p.add_subparsers(dest="data_verb", required=True)
    p = data_verbs.add_parser("check", help="validate a fine-tuning data set (exit 1 on errors)")
    p.add_argument("file", nargs="?", help=".jsonl, COCO .json, a Roboflow / maestro or Hugging Face dataset "
                                           "folder (or --config)")
    p.add_argument("--config", help="a training config: check its train_file (and eval_file) as `palikit "
                                    "train` reads them, with its model and max_text_len")
    p.add_argument("--split", default="train", help="which split of a dataset folder")
    p.add_argument("--columns", type=json_object, help="a Hugging Face dataset's columns, as in a train config")
    p.add_argument("--model", help="preset name or model folder: image tokens and length limit "
                                   "(a folder's tokenizer.model is used too)")
    p.add_argument("--tokenizer", help="tokenizer.model: check sequence lengths")
    p.add_argument("--max-text-len", type=POSITIVE, help="warn about longer text (it would be truncated)")
    p.add_argument("--open-images", action="store_true", help="also decode every image (slower)")
    p.add_argument("--task", default="detect", choices=["detect", "segment"],
                   help="what a COCO file becomes, as in training (segment needs --vae)")
    p.add_argument("--vae", help="mask codec npz, to check a COCO file as segment examples")
    p.add_argument("--image-dir", help="where a COCO file's images are (default: beside the file)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_data_check)

    p = verbs.add_parser("export", help="ONNX graphs in transformers.js's layout (embed_tokens, vision_encoder, "
                         "decoder_model_merged), run by onnxruntime (palikit.export.load)")
    p.add_argument("model", help="folder, .npz, hub id, 'default', or a LoRA adapter folder (merged)")
    p.add_argument("--to", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quantize", choices=["q8"], help="also int8 copies of the graphs (*_quantized.onnx)")
    p.add_argument("--adapter", help="a LoRA adapter folder merged into the model before export")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("serve", help="HTTP server: OpenAI-compatible chat completions, task endpoints, web demo")
    _model_args(p, json_output=False, skip=("adapter",))
    add_adapter_flags(p, dir_flag=False)  # ServerSettings has --adapters-dir
    add_flags(p, ServerSettings)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verb == "train" else logging.WARNING, format="palikit: %(message)s")
    try:
        rc = args.func(args)
    except BrokenPipeError:  # `palikit ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and the exit flush stays quiet
        return 0
    except (InputError, CheckpointError, OSError, ValueError) as e:  # OSError: a file not found / not writable
        if os.environ.get("PALIKIT_DEBUG") == "1":
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: say it once
            print(f"palikit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
