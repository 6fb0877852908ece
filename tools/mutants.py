"""Break palikit on purpose and check that the tests guarding each behaviour fail.

A test that passes whatever the code does guards nothing. Each entry of MUTANTS is one deliberate
breakage: pieces of a source file, what to put in their place, and the tests that must fail on it.
The tool copies the working tree to a temporary folder, first runs every listed test there on the
unmutated code (they must pass, or a failure would prove nothing), then applies one mutant at a
time to a fresh copy, runs its tests (the copy's palikit first on the path, also in the
subprocesses the tests start) and reports:

    killed     every listed test failed: the tests see the breakage
    SURVIVED   a listed test passed (or was skipped) on broken code: it cannot fail on this
    STALE      the source no longer holds the mutant's text once (the code moved: update the entry)
    ERROR      pytest could not run the tests (collection error, missing test id)
    HUNG       the tests ran past the time limit instead of failing

    .venv/bin/python tools/mutants.py                 # every mutant (about 10 minutes on 2 cores)
    .venv/bin/python tools/mutants.py resume masks    # those whose name contains a word
    .venv/bin/python tools/mutants.py --list
    .venv/bin/python tools/mutants.py --tests-from HEAD~3   # would an older tests/ have caught them?

Exit status 1 when the baseline fails or any mutant is not killed. This is mutation testing done
by hand (as mutmut / cosmic-ray automate it): the mutants are the bugs the tests were written
against, so each new behaviour gets a test and a mutant that the test kills.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 600  # per pytest run; a mutant that makes a test hang must not stall CI


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str | tuple[str, ...]  # each must occur exactly once in the file
    new: str | tuple[str, ...]  # what replaces each
    tests: tuple[str, ...]  # pytest node ids; every one must fail

    def apply(self, source: str) -> str | None:
        """The mutated source, or None when an `old` text does not occur exactly once."""
        olds, news = ((self.old,), (self.new,)) if isinstance(self.old, str) else (self.old, self.new)
        for old, new in zip(olds, news, strict=True):
            if source.count(old) != 1:
                return None
            source = source.replace(old, new)
        return source


FT, API, SERVE, WEB = (
    "tests/test_finetune.py::",
    "tests/test_api.py::",
    "tests/test_serve.py::",
    "tests/test_web_demo.py::",
)
WEIGHTS, CLI, TASKS = "tests/test_weights.py::", "tests/test_cli.py::", "tests/test_tasks.py::"
ENGINE = "tests/test_engine.py::"
REGISTRY = "tests/test_registry.py::test_a_registered_task_is_offered_everywhere"
FIXED = "('caption', 'ask', 'question', 'ocr', 'detect', 'segment')"  # the built-in tasks, as a list

MUTANTS = [
    # ---- fine-tuning: resume, distributed gradients ----
    Mutant(
        "resume restarts at step 0",
        "palikit/finetune/recipe.py",
        "        if cfg.resume and ckpt is not None:\n            self.load_checkpoint(ckpt)",
        "        if False:\n            self.load_checkpoint(ckpt)",
        (
            FT + "test_resume_is_exact[full]",
            FT + "test_resume_is_exact[lora]",
            FT + "test_resume_after_sigkill",
            FT + "test_fsdp_resume_is_exact",
        ),
    ),
    Mutant(
        "resume leaves a half-written checkpoint",
        "palikit/finetune/recipe.py",
        'for tmp in self.out.glob(".step-*.tmp"):',
        "for tmp in []:",
        (FT + "test_resume_after_sigkill",),
    ),
    Mutant(
        "checkpoint renamed before every rank wrote to it",
        "palikit/finetune/recipe.py",
        "        dist.barrier()  # every rank's RNG file is in tmp before rank 0 renames it",
        "        # (no barrier)",
        (FT + "test_ddp_checkpoint_waits_for_every_rank",),
    ),
    Mutant(
        "loss not scaled by the number of ranks",
        "palikit/finetune/recipe.py",
        "loss = per_example.sum() * (self.world / cfg.batch_size)",
        "loss = per_example.sum() / cfg.batch_size",
        (
            FT + "test_torchrun_matches_single_process[ddp-sgd]",
            FT + "test_torchrun_matches_single_process[fsdp-sgd]",
        ),
    ),
    Mutant(
        "loss averaged per micro-batch",
        "palikit/finetune/recipe.py",
        "loss = per_example.sum() * (self.world / cfg.batch_size)",
        "loss = per_example.mean()",
        (
            FT + "test_torchrun_matches_single_process[ddp-sgd]",
            FT + "test_torchrun_matches_single_process[fsdp-sgd]",
        ),
    ),
    # ---- palikit run ----
    Mutant(
        "run restarts from scratch",
        "palikit/jobs.py",
        "    done = finished_lines(output_path)\n",
        "    finished_lines(output_path)\n    output_path.unlink(missing_ok=True)\n    done = set()\n",
        (API + "test_run_resumes_after_kill",),
    ),
    # ---- scoring, task helpers ----
    Mutant(
        "score without the <eos> term",
        "palikit/api.py",
        "token_lp = logprobs.gather(-1, labels[:, None])[:, 0]",
        "token_lp = logprobs.gather(-1, labels[:, None])[:, 0] * (labels != self.tokenizer.eos_id)",
        (API + "test_score_prefers_the_suffix_the_model_generates",),
    ),
    Mutant(
        "task methods ignore lang",
        "palikit/api.py",
        "            if name in names:\n                values[name] = kwargs.pop(key)",
        "            if name in names:\n                values[name] = kwargs.pop(key) if name != 'lang' else 'en'",
        (API + "test_text_tasks_send_their_prompts",),
    ),
    Mutant(
        "caption prompt ignores lang",
        "palikit/tasks.py",
        '    return f"{style} {lang}"',
        '    return f"{style} en"',
        (API + "test_text_tasks_send_their_prompts",),
    ),
    Mutant(
        "demo prints the caption as the OCR answer",
        "palikit/cli.py",
        'print("ocr".ljust(40) + f"-> {pipe.ocr(image)}")',
        'print("ocr".ljust(40) + f"-> {pipe.caption(image)}")',
        ("tests/test_default_model.py::test_demo_writes_answers_and_an_overlay",),
    ),
    # ---- masks, drawing ----
    Mutant(
        "masks pasted at the image origin",
        "palikit/maskcodec.py",
        "    out[y1:y2, x1:x2] = np.asarray(resized) > 0.0",
        "    out[: y2 - y1, : x2 - x1] = np.asarray(resized) > 0.0",
        (API + "test_segment_pastes_masks", SERVE + "test_detect_and_segment_give_pixel_boxes_and_masks"),
    ),
    Mutant(
        "web demo draws no mask",
        "palikit/static/app.js",
        "    if (o.mask) ctx.drawImage(maskLayer(o.mask, colour), 0, 0, canvas.width, canvas.height);\n",
        "",
        (WEB + "test_segment_draws_a_mask",),
    ),
    Mutant(
        "web demo draws masks 8 pixels too low",
        "palikit/static/app.js",
        "ctx.drawImage(maskLayer(o.mask, colour), 0, 0, canvas.width, canvas.height)",
        "ctx.drawImage(maskLayer(o.mask, colour), 0, 8 * scale, canvas.width, canvas.height)",
        (WEB + "test_segment_draws_a_mask",),
    ),
    Mutant(
        "draw colours by position, not label",
        "palikit/overlay.py",
        "    for r in results:\n        colour = _colour(r.label)",
        "    for i, r in enumerate(results):\n        colour = _PALETTE[i % len(_PALETTE)]",
        ("tests/test_tasks.py::test_draw",),
    ),
    # ---- the server ----
    Mutant(
        "server rotates answers within a batch",
        "palikit/serve/batcher.py",
        "for job, (text, g) in zip(jobs, outs):",
        "for job, (text, g) in zip(jobs, outs[1:] + outs[:1]):",
        (SERVE + "test_concurrent_requests_are_batched_and_correct",),
    ),
    Mutant(
        "server runs a batch on its first request's image",
        "palikit/serve/batcher.py",
        "generate_details([j.images for j in jobs]",
        "generate_details([jobs[0].images for j in jobs]",
        (SERVE + "test_concurrent_requests_are_batched_and_correct",),
    ),
    Mutant(
        "server ignores temperature",
        "palikit/serve/app.py",
        "    if not temperature:\n",
        "    if True:\n",
        (SERVE + "test_openai_client",),
    ),
    Mutant(
        "server ignores top_p",
        "palikit/serve/app.py",
        '"top_p": top_p or 1.0',
        '"top_p": 1.0',
        (SERVE + "test_openai_client",),
    ),
    Mutant(
        "server ignores seed",
        "palikit/serve/app.py",
        '            "seed": seed}',
        '            "seed": None}',
        (SERVE + "test_openai_client",),
    ),
    Mutant(
        "finish_reason is always stop",
        "palikit/serve/batcher.py",
        '"finish_reason": "length" if len(tokens) >= job.max_new_tokens and not stopped else "stop"}',
        '"finish_reason": "stop"}',
        (SERVE + "test_openai_client", SERVE + "test_finish_reason_stop_and_length"),
    ),
    Mutant(
        "stream goes on for a gone client",
        "palikit/serve/batcher.py",
        "                if job.cancelled or stopped:",
        "                if stopped:",
        (SERVE + "test_client_disconnect_mid_stream[static]",),
    ),
    Mutant(
        "engine stream goes on for a gone client",
        "palikit/serve/batcher.py",
        "        job.on_cancel = request.cancel",
        "        job.on_cancel = None",
        (SERVE + "test_client_disconnect_mid_stream[continuous]",),
    ),
    Mutant(
        "the engine generates past a stop string",
        "palikit/engine.py",
        "            if r.stop and cut_at_stop(self.pipe.tokenizer.decode(r.tokens), r.stop)[1]:",
        "            if False:",
        (SERVE + "test_stop_strings[continuous]",),
    ),
    Mutant(
        "a stream sends the start of a stop string",
        "palikit/serve/batcher.py",
        "        text = text[: len(text) - max((len(s) - 1 for s in job.stop), default=0)]",
        "        pass",
        (SERVE + "test_stop_strings[continuous]", SERVE + "test_stop_strings[static]"),
    ),
    Mutant(
        "the answer keeps its stop string",
        "palikit/serve/batcher.py",
        "    text, stopped = cut_at_stop(text, job.stop)\n",
        "    stopped = False\n",
        (SERVE + "test_stop_strings[continuous]", SERVE + "test_stop_strings[static]"),
    ),
    Mutant(
        "serve takes every core from the HTTP loop",
        "palikit/serve/app.py",
        "    torch.set_num_threads(threads or server_threads())\n",
        "",
        (CLI + "test_serve_verb_binds_localhost_without_a_key_by_default", CLI + "test_serve_verb_options"),
    ),
    Mutant(
        "queue without a limit",
        "palikit/serve/batcher.py",
        "if len(self.waiting) >= self.max_queue:",
        "if False:",
        (SERVE + "test_full_queue_answers_503_with_retry_after",),
    ),
    Mutant(
        "one failing request fails its batch",
        "palikit/serve/batcher.py",
        "            if len(jobs) == 1:\n                raise",
        "            if True:\n                raise",
        (SERVE + "test_a_failing_request_does_not_fail_its_batch",),
    ),
    Mutant(
        "no request-body timeout",
        "palikit/serve/guard.py",
        "await asyncio.wait_for(receive(), start + BODY_TIMEOUT_S - time.perf_counter())",
        "await receive()",
        (SERVE + "test_slow_request_body_is_408",),
    ),
    Mutant(
        "no request timeout",
        "palikit/serve/app.py",
        "asyncio.wait_for(job.out.get(), max(0.0, job.deadline - time.monotonic()))",
        "asyncio.wait_for(job.out.get(), None)",
        (SERVE + "test_request_timeout_is_504",),
    ),
    # ---- the model ----
    Mutant(
        "every <image> slot gets the first image",
        "palikit/paligemma.py",
        "image_tokens.to(x.dtype))",
        "image_tokens[:1].expand_as(image_tokens).to(x.dtype))",
        (
            "tests/test_generate.py::test_two_images_in_one_prompt[pg1]",
            "tests/test_generate.py::test_two_images_in_one_prompt[pg2]",
        ),
    ),
    Mutant(
        "images embedded in reverse order",
        "palikit/paligemma.py",
        "image_tokens.to(x.dtype))",
        "image_tokens.flip(0).to(x.dtype))",
        (
            "tests/test_generate.py::test_two_images_in_one_prompt[pg1]",
            "tests/test_generate.py::test_two_images_in_one_prompt[pg2]",
        ),
    ),
    Mutant(
        "RMSNorm statistics in bfloat16",
        "palikit/gemma.py",
        "        h = x.float()  # statistics in float32 whatever the model dtype",
        "        h = x",
        (WEIGHTS + "test_bfloat16_load[pg1]", WEIGHTS + "test_bfloat16_load[pg2]"),
    ),
    Mutant(
        "sqrt(D) not rounded to the weight dtype",
        "palikit/gemma.py",
        "torch.tensor(self.config.hidden_size**0.5, dtype=rows.dtype)",
        "self.config.hidden_size**0.5",
        (WEIGHTS + "test_bfloat16_load[pg1]", WEIGHTS + "test_bfloat16_load[pg2]"),
    ),
    Mutant(
        "decoding at the wrong position",
        "palikit/generate.py",
        "hidden = model.language_model(x, q_pos, masks, cache, start=slot)",
        "hidden = model.language_model(x, q_pos + 1, masks, cache, start=slot)",
        (WEIGHTS + "test_big_vision_npz[pg1-f32]", WEIGHTS + "test_big_vision_npz[pg2-f32]"),
    ),
    Mutant(
        "no attention soft-cap",
        "palikit/gemma.py",
        "            scores = cap * torch.tanh(scores / cap)  # before masking, as in big_vision and HF\n",
        "",
        (
            "tests/test_parity.py::test_logits_match_transformers[pg2]",
            "tests/test_parity.py::test_score_matches_transformers_loglikelihood[pg2]",
        ),
    ),
    Mutant(
        "no final logit soft-cap",
        "palikit/gemma.py",
        "        return cap * torch.tanh(logits / cap) if cap and capped else logits",
        "        return logits",
        (
            "tests/test_parity.py::test_logits_match_transformers[pg2]",
            "tests/test_parity.py::test_score_matches_transformers_loglikelihood[pg2]",
        ),
    ),
    # ---- where the final soft-cap applies ----
    Mutant(
        "big_vision mode caps the prefill",
        "palikit/config.py",
        '        return self.logit_softcap == "config" or where == "decode"',
        '        return self.logit_softcap == "config" or where in ("decode", "prefill")',
        ("tests/test_softcap.py::test_each_mode_against_the_formula[big_vision-False-False-True]",),
    ),
    Mutant(
        "big_vision mode caps teacher-forced logits",
        "palikit/config.py",
        '        return self.logit_softcap == "config" or where == "decode"',
        '        return self.logit_softcap == "config" or where != "prefill"',
        ("tests/test_softcap.py::test_each_mode_against_the_formula[big_vision-False-False-True]",),
    ),
    Mutant(
        "off mode still caps",
        "palikit/config.py",
        '        if not self.text.final_logit_softcap or self.logit_softcap == "off":',
        '        if not self.text.final_logit_softcap:',
        ("tests/test_softcap.py::test_each_mode_against_the_formula[off-False-False-False]",),
    ),
    Mutant(
        "an npz runs with transformers' cap",
        "palikit/api.py",
        '        model.config.logit_softcap = logit_softcap or "big_vision"',
        '        model.config.logit_softcap = logit_softcap or "config"',
        ("tests/test_softcap.py::test_defaults_follow_the_source",),
    ),
    Mutant(
        "fine-tuning keeps the cap by default",
        "palikit/finetune/recipe.py",
        '        if cfg.final_logit_softcap == "off":',
        "        if False:",
        ("tests/test_softcap.py::test_a_fine_tune_saves_what_it_trained_with[off-None]",),
    ),
    Mutant(
        "merge forgets the cap the adapters trained without",
        "palikit/finetune/recipe.py",
        '        model.config.text.final_logit_softcap = json.loads(trained.read_text())["final_logit_softcap"]',
        "        pass",
        (FT + "test_merge_lora",),
    ),
    # ---- checkpoints ----
    Mutant(
        "converting safetensors read through mmap",
        "palikit/weights.py",
        'return "mmap" if same else "pread"',
        'return "mmap"',
        (
            WEIGHTS + "test_bf16_load_peak_memory[f32-single]",
            WEIGHTS + "test_bf16_load_peak_memory[f32-sharded]",
        ),
    ),
    Mutant(
        "npz object arrays not refused",
        "palikit/weights.py",
        "if pickled := [arrays[k] for k, (_, dtype) in headers.items() if dtype.hasobject]:",
        "if pickled := []:",
        (
            WEIGHTS + "test_npz_with_object_arrays_is_refused_unread[pg1-extra array]",
            WEIGHTS + "test_npz_with_object_arrays_is_refused_unread[pg1-weight]",
        ),
    ),
    Mutant(
        "npz object arrays unpickled",
        "palikit/weights.py",
        (
            "if pickled := [arrays[k] for k, (_, dtype) in headers.items() if dtype.hasobject]:",
            "np.load(path, allow_pickle=False)",
        ),
        ("if pickled := []:", "np.load(path, allow_pickle=True)"),
        (
            WEIGHTS + "test_npz_with_object_arrays_is_refused_unread[pg1-extra array]",
            WEIGHTS + "test_npz_with_object_arrays_is_refused_unread[pg1-weight]",
        ),
    ),
    Mutant(
        "a bfloat16 file copied instead of mapped",
        "palikit/weights.py",
        'return "mmap" if same else "pread"',
        'return "pread"',
        (WEIGHTS + "test_bf16_load_peak_memory[bf16]",),
    ),
    Mutant(
        "hub ids skip the cache",
        "palikit/weights.py",
        "    try:  # the local cache first: works offline and costs no request\n"
        "        return Path(snapshot_download(str(source), allow_patterns=patterns, "
        "local_files_only=True))\n"
        "    except LocalEntryNotFoundError:\n        pass\n",
        "",
        (
            WEIGHTS + "test_hub_id_loads_from_the_cache_offline",
            WEIGHTS + "test_hub_id_downloads_only_when_online",
        ),
    ),
    Mutant(
        "preprocessor_config.json ignored",
        "palikit/api.py",
        "        if pre.exists():",
        "        if False:",
        (
            WEIGHTS + "test_resize_filter_comes_from_the_preprocessor_config[2-bilinear]",
            WEIGHTS + "test_resize_filter_comes_from_the_preprocessor_config[0-nearest]",
        ),
    ),
    Mutant(
        "stream embeds only the first image",
        "palikit/api.py",
        "self.embed_images([images]), cfg,",
        "self.embed_images([images[:1] * len(images)]), cfg,",
        (API + "test_stream_yields_the_tokens_generate_makes_and_stops_when_dropped",),
    ),
    Mutant(
        "stream ignores sampling",
        "palikit/api.py",
        "        cfg = gen.SamplingConfig(max_new_tokens=max_new_tokens, **sampling)\n        (images,)",
        "        cfg = gen.SamplingConfig(max_new_tokens=max_new_tokens)\n        (images,)",
        (API + "test_stream_yields_the_tokens_generate_makes_and_stops_when_dropped",),
    ),
    # ---- the task registry: each surface keeping its own list of tasks ----
    Mutant(
        "Pipeline methods from a fixed task list",
        "palikit/api.py",
        "        spec = tasks.TASKS.get(name)\n",
        "        spec = tasks.TASKS.get(name) if name in " + FIXED + " else None\n",
        (REGISTRY,),
    ),
    Mutant(
        "palikit run from a fixed task list",
        "palikit/jobs.py",
        "    if verb not in tasks.TASKS:",
        "    if verb not in " + FIXED + ":",
        (REGISTRY,),
    ),
    Mutant(
        "CLI verbs from a fixed task list",
        "palikit/cli.py",
        "    for spec in tasks.TASKS.values():  # one verb per task",
        "    for spec in [tasks.TASKS[v] for v in " + FIXED + "]:",
        (REGISTRY,),
    ),
    Mutant(
        "server routes from a fixed task list",
        "palikit/serve/app.py",
        "    for spec in tasks.TASKS.values():\n        task_route(spec)",
        "    for spec in [tasks.TASKS[v] for v in " + FIXED + "]:\n        task_route(spec)",
        (REGISTRY,),
    ),
    Mutant(
        "web demo menu from a fixed task list",
        "palikit/serve/app.py",
        "        return [spec.describe() for spec in tasks.TASKS.values()] + [free]",
        "        return [tasks.TASKS[v].describe() for v in " + FIXED + "] + [free]",
        (REGISTRY,),
    ),
    Mutant(
        "data check from a fixed list of prompt words",
        "palikit/data.py",
        "report.tasks[word if word in tasks.prompt_words() else \"other\"] += 1",
        "report.tasks[word if word in (\"caption\", \"detect\") else \"other\"] += 1",
        (REGISTRY,),
    ),
    # ---- nothing lost, nothing confusing ----
    Mutant(
        "a bad job aborts palikit run",
        "palikit/jobs.py",
        "        if spec.masks and codec is None and pipe.codec_path is None:",
        "        if False:",
        (API + "test_run_gives_a_bad_job_its_error_and_runs_the_rest",),
    ),
    Mutant(
        "resume drops a complete last record without its newline",
        "palikit/atomic.py",
        "            good_bytes += len(raw)\n            unterminated = not raw.endswith(b\"\\n\")",
        "            if not raw.endswith(b\"\\n\"):\n                break\n            good_bytes += len(raw)",
        (API + "test_run_keeps_a_complete_last_record_without_its_newline",),
    ),
    Mutant(
        "saved folders lose the preprocessor config",
        "palikit/api.py",
        '    write_text_atomic(folder / "preprocessor_config.json", json.dumps(preprocessor, indent=2) + "\\n")\n',
        "",
        (CLI + "test_every_folder_palikit_writes_is_a_complete_model",),
    ),
    Mutant(
        "saved folders lose the mask codec",
        "palikit/api.py",
        '(Path(codec) if codec else None, None)]',
        '(None, None)]',
        (CLI + "test_every_folder_palikit_writes_is_a_complete_model",),
    ),
    Mutant(
        "CUDA asked of a CPU-only torch",
        "palikit/api.py",
        "    check_device(device)\n    if attention not in ATTENTION_KERNELS:",
        "    if attention not in ATTENTION_KERNELS:",
        (CLI + "test_load_on_cuda_without_cuda_is_one_clear_error",
         CLI + "test_cli_checks_arguments_as_the_server_checks_requests"),
    ),
    Mutant(
        "the CLI takes an empty prompt",
        "palikit/cli.py",
        'p.add_argument("--prompt", required=True, type=text,',
        'p.add_argument("--prompt", required=True,',
        (CLI + "test_cli_checks_arguments_as_the_server_checks_requests",),
    ),
    Mutant(
        "the CLI takes any temperature",
        "palikit/cli.py",
        'p.add_argument("--temperature", type=number(float, 0, 2),',
        'p.add_argument("--temperature", type=float,',
        (CLI + "test_cli_checks_arguments_as_the_server_checks_requests",),
    ),
    Mutant(
        "a non-npz codec file read by numpy",
        "palikit/maskcodec.py",
        "        if not zipfile.is_zipfile(path):",
        "        if False:",
        (CLI + "test_cli_checks_arguments_as_the_server_checks_requests",),
    ),
    Mutant(
        "the server takes non-JSON bodies",
        "palikit/serve/guard.py",
        'if scope["method"] == "POST" and kind and',
        'if False and',
        (SERVE + "test_bad_requests_get_json_errors_and_the_server_keeps_serving",),
    ),
    Mutant(
        "error texts show Python reprs",
        "palikit/processor.py",
        '        why = _OBJECT_REPR_RE.sub("", str(e))',
        "        why = str(e)",
        (SERVE + "test_bad_requests_get_json_errors_and_the_server_keeps_serving",),
    ),
    Mutant(
        "data check --model default unresolved",
        "palikit/data.py",
        "            folder = resolve_source(config)",
        "            folder = Path(config)",
        (CLI + "test_data_check_model_takes_what_every_verb_takes",),
    ),
    Mutant(
        "confidence shown as the log-prob",
        "palikit/tasks.py",
        "        return None if self.logprob is None else math.exp(self.logprob)",
        "        return self.logprob",
        (TASKS + "test_results_to_dict_and_arrays", TASKS + "test_results_go_to_supervision_and_its_annotators"),
    ),
    Mutant(
        "supervision detections without class_id",
        "palikit/tasks.py",
        'confidence=a["confidence"], class_id=a["class_id"],',
        'confidence=a["confidence"],',
        (TASKS + "test_results_go_to_supervision_and_its_annotators",),
    ),
    Mutant(
        "draw refuses a path",
        "palikit/overlay.py",
        '    out = load_image(image).convert("RGB")',
        '    out = image.convert("RGB")',
        (TASKS + "test_draw_takes_a_path_like_every_api_call",),
    ),
    Mutant(
        "hidden web controls shown",
        "palikit/static/style.css",
        "[hidden] { display: none !important; }",
        "",
        (WEB + "test_hidden_controls_are_not_shown",),
    ),
    Mutant(
        "web canvas at image resolution",
        "palikit/static/app.js",
        "  const shown = Math.min(canvas.parentElement.clientWidth || image.naturalWidth, 720);",
        "  const shown = image.naturalWidth;",
        (WEB + "test_labels_are_readable_and_leave_the_object_visible",),
    ),
    Mutant(
        "web labels drawn over the object",
        "palikit/static/app.js",
        "      const ty = cy1 - lineWidth >= th ? cy1 - lineWidth - th\n"
        "        : cy2 + lineWidth + th <= canvas.height ? cy2 + lineWidth : cy1 + lineWidth;",
        "      const ty = cy1 + lineWidth;  // inside the box's top, over the object",
        (WEB + "test_labels_are_readable_and_leave_the_object_visible",),
    ),
    Mutant(
        "a web error keeps the last answer",
        "palikit/static/app.js",
        "    clearResult();  // an old answer must not look like this request's\n",
        "",
        (WEB + "test_an_error_clears_the_previous_result",),
    ),
    Mutant(
        "API docs from a CDN",
        "palikit/serve/app.py",
        ("    app = FastAPIOffline(", "lifespan=lifespan, static_url=DOCS_ASSETS)"),
        ("    app = FastAPI(", "lifespan=lifespan)"),
        (WEB + "test_api_docs_work_offline",),
    ),
    Mutant(
        "an output with 0-based lines resumed",
        "palikit/jobs.py",
        "    if 0 in done:",
        "    if False:",
        (CLI + "test_run_stops_with_one_line_only_for_problems_of_the_run_itself",),
    ),
    Mutant(
        "the CLI prints the log-prob as the score",
        "palikit/cli.py",
        'shown = f" ({r.confidence:.2f})" if r.confidence is not None else ""',
        'shown = f" ({r.logprob:.2f})" if r.logprob is not None else ""',
        (CLI + "test_task_verbs_print_the_confidence",),
    ),
    Mutant(
        "steps=0 passes validation",
        "palikit/finetune/config.py",
        "        if value is not None and not value > 0:",
        "        if value is not None and value < 0:",
        (FT + "test_config_refuses_zero_steps_and_says_where_yaml_breaks",),
    ),
    Mutant(
        "a broken YAML file is the parser's traceback",
        "palikit/finetune/config.py",
        "        except yaml.YAMLError as e:",
        "        except KeyError as e:",
        (FT + "test_config_refuses_zero_steps_and_says_where_yaml_breaks",),
    ),
    Mutant(
        "every torchrun rank prints the error",
        "palikit/cli.py",
        '        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun',
        "        if True:  # under torchrun",
        (FT + "test_config_errors_under_torchrun_are_said_once",),
    ),
    Mutant(
        "the parameter table counts adapters apart from their module",
        "palikit/finetune/model.py",
        'counts = [rows.setdefault(name.split(".")[0], [0, 0])]',
        'counts = [rows.setdefault("lora" if ".lora_" in name else name.split(".")[0], [0, 0])]',
        (FT + "test_param_table_counts_adapters_where_they_sit",),
    ),
    # ---- the command line ----
    Mutant(
        "serve binds every interface by default",
        "palikit/cli.py",
        'p.add_argument("--host", default="127.0.0.1"',
        'p.add_argument("--host", default="0.0.0.0"',
        (CLI + "test_serve_verb_binds_localhost_without_a_key_by_default",),
    ),
    Mutant(
        "train ignores --set",
        "palikit/cli.py",
        "overrides = args.overrides + (",
        "overrides = [] + (",
        (CLI + "test_train_verb_takes_overrides_resume_and_smoke",),
    ),
    Mutant(
        "eval ignores --seed",
        "palikit/cli.py",
        '"seed": args.seed,',
        '"seed": 12345,',
        (CLI + "test_eval_verb_passes_its_options",),
    ),
    Mutant(
        "data check always exits 0",
        "palikit/cli.py",
        "return 0 if report.ok else 1",
        "return 0",
        (CLI + "test_data_check_verb_exit_status_and_report",),
    ),
    Mutant(
        "vqav2 without leave-one-out",
        "palikit/metrics.py",
        "left_out = [matches - (a == prediction) for a in answers]",
        "left_out = [matches for a in answers]",
        (
            "tests/test_metrics.py::test_vqav2_leave_one_out[1-0.3]",
            "tests/test_metrics.py::test_vqav2_leave_one_out[2-0.6]",
            "tests/test_metrics.py::test_vqav2_leave_one_out[3-0.9]",
            "tests/test_metrics.py::test_metric_records_are_json_and_aggregate[vqav2_accuracy]",
        ),
    ),
    Mutant(
        "vqav2 normalises even when the ten answers agree",
        "palikit/metrics.py",
        "    if len(set(answers)) > 1:\n        prediction, answers = normalize_vqa_answer(prediction)",
        "    if answers:\n        prediction, answers = normalize_vqa_answer(prediction)",
        ("tests/test_metrics.py::test_vqav2_normalises_only_when_the_answers_disagree",),
    ),
    Mutant(
        "VQA normalisation without the digit-comma rule",
        "palikit/metrics.py",
        'delete_all = re.search(r"\\d,\\d", text) is not None',
        "delete_all = False",
        (
            "tests/test_metrics.py::test_vqa_answer_normalisation[1,000-1000]",
            "tests/test_metrics.py::test_vqav2_normalises_only_when_the_answers_disagree",
        ),
    ),
    Mutant(
        "VQA normalisation keeps contractions and number words as typed",
        "palikit/metrics.py",
        'return " ".join(_VQA_WORD_MAP.get(w, w) for w in words)',
        'return " ".join(words)',
        (
            "tests/test_metrics.py::test_vqa_answer_normalisation[dont-don't]",
            "tests/test_metrics.py::test_vqa_answer_normalisation[none-0]",
            "tests/test_metrics.py::test_vqav2_normalises_only_when_the_answers_disagree",
        ),
    ),
    Mutant(
        "ANLS keeps a distance equal to the threshold",
        "palikit/metrics.py",
        "return 1.0 - distance if distance < theta else 0.0",
        "return 1.0 - distance if distance <= theta else 0.0",
        ("tests/test_metrics.py::test_anls",),
    ),
    Mutant(
        "ChartQA reads 45% as 45",
        "palikit/metrics.py",
        'return float(text[:-1]) / 100 if text.endswith("%") else float(text)',
        'return float(text[:-1]) if text.endswith("%") else float(text)',
        (
            "tests/test_metrics.py::test_relaxed_accuracy[45%-0.45-1.0]",
            "tests/test_metrics.py::test_relaxed_accuracy[45%-45-0.0]",
            "tests/test_metrics.py::test_metric_records_are_json_and_aggregate[relaxed_accuracy]",
        ),
    ),
    Mutant(
        "ChartQA tolerance excludes exactly 5%",
        "palikit/metrics.py",
        "return float(abs(predicted - target) / abs(target) <= max_relative_error)",
        "return float(abs(predicted - target) / abs(target) < max_relative_error)",
        (
            "tests/test_metrics.py::test_relaxed_accuracy[105-100-1.0]",
            "tests/test_metrics.py::test_relaxed_accuracy[95-100-1.0]",
        ),
    ),
    Mutant(
        "RefCOCO output may start anywhere",
        "palikit/metrics.py",
        "start = _SEGMENTATION_START.match(prediction)",
        "start = _SEGMENTATION_START.search(prediction)",
        ("tests/test_metrics.py::test_segmentation_invalid_outputs[leading-space]",),
    ),
    Mutant(
        "RefCOCO box not truncated to pixels before the validity check",
        "palikit/metrics.py",
        "if int(x2 * w) <= int(x1 * w) or int(y2 * h) <= int(y1 * h):",
        "if x2 * w <= x1 * w or y2 * h <= y1 * h:",
        ("tests/test_metrics.py::test_segmentation_metric",),
    ),
    Mutant(
        "detection mAP ignores the object scores",
        "palikit/metrics.py",
        '"scores": [1.0 if o.logprob is None else math.exp(o.logprob) for o in objects],',
        '"scores": [1.0 for o in objects],',
        ("tests/test_metrics.py::test_detection_map_is_cocoeval",),
    ),
    Mutant(
        "refcoco boxes kept as xywh",
        "palikit/benchmarks.py",
        'obj = {"label": "", "box": [x, y, x + w, y + h]}',
        'obj = {"label": "", "box": [x, y, w, h]}',
        ("tests/test_benchmarks.py::test_refcoco_parquet",
         "tests/test_benchmarks.py::test_refcoco_json_boxes_and_masks"),
    ),
    Mutant(
        "benchmark answers not stripped",
        "palikit/benchmarks.py",
        "return [str(v).strip() for v in values]",
        "return [str(v) for v in values]",
        ("tests/test_benchmarks.py::test_reader[vqav2]", "tests/test_benchmarks.py::test_reader[ocrvqa]",
         "tests/test_benchmarks.py::test_parquet[coco_captions]"),
    ),
    Mutant(
        "benchmark image folder not checked on the first image",
        "palikit/benchmarks.py",
        "self.root = next((c for c in self.candidates if (c / name).is_file()), None)",
        "self.root = self.candidates[0]",
        ("tests/test_benchmarks.py::test_missing_first_image_names_the_folders",
         "tests/test_benchmarks.py::test_reader[vqav2]"),
    ),
    Mutant(
        "benchmark pickle unpickled before it is refused",
        "palikit/benchmarks.py",
        "    if path.suffix in _PICKLES:\n        raise _pickle_error(path)",
        '    if path.suffix in _PICKLES:\n        __import__("pickle").loads(path.read_bytes())\n'
        "        raise _pickle_error(path)",
        ("tests/test_benchmarks.py::test_pickle_refused_unopened",),
    ),
    Mutant(
        "benchmark split names not mapped to the files' names",
        "palikit/benchmarks.py",
        "        file_split = files.splits.get(split, split)",
        "        file_split = split",
        ("tests/test_benchmarks.py::test_reader[vqav2]", "tests/test_benchmarks.py::test_reader[ocrvqa]",
         "tests/test_benchmarks.py::test_reader[coco_captions]"),
    ),
    Mutant(
        "textcaps captions not grouped per image",
        "palikit/benchmarks.py",
        "    yield from _grouped(examples) if fields.group else examples",
        "    yield from examples",
        ("tests/test_benchmarks.py::test_reader[textcaps]", "tests/test_benchmarks.py::test_parquet[textcaps]"),
    ),
    Mutant(
        "benchmark record filter (ChartQA type, OCR-VQA split) ignored",
        "palikit/benchmarks.py",
        "            if any(str(_get(record, path)) != value for path, value in keep.items()):",
        "            if False:",
        ("tests/test_benchmarks.py::test_parquet[chartqa]", "tests/test_benchmarks.py::test_parquet[chartqa_aug]",
         "tests/test_benchmarks.py::test_reader[ocrvqa]"),
    ),
    Mutant(
        "published() matches the whole checkpoint path",
        "palikit/benchmarks.py",
        '    key = Path(str(checkpoint).rstrip("/")).name.lower()',
        "    key = str(checkpoint).lower()",
        ("tests/test_benchmarks.py::test_published",),
    ),
    Mutant(
        "eval resume generates the finished examples again",
        "palikit/evaluate.py",
        "mine = [i for i in range(rank, len(examples), world) if i not in done]",
        "mine = [i for i in range(rank, len(examples), world)]",
        ("tests/test_evaluate.py::test_resume_after_kill_loses_and_repeats_nothing",),
    ),
    Mutant(
        "every eval rank takes rank 0's examples",
        "palikit/evaluate.py",
        "mine = [i for i in range(rank, len(examples), world) if i not in done]",
        "mine = [i for i in range(0, len(examples), world) if i not in done]",
        ("tests/test_evaluate.py::test_torchrun_two_ranks_equal_one_process",),
    ),
    Mutant(
        "eval and run leave the rank files behind",
        "palikit/atomic.py",
        "        for path in parts:\n            path.unlink()\n",
        "",
        ("tests/test_evaluate.py::test_torchrun_two_ranks_equal_one_process",
         API + "test_run_under_torchrun_equals_one_process"),
    ),
    Mutant(
        "eval scores every .jsonl example by exact match",
        "palikit/evaluate.py",
        'return spec.eval_metrics if spec is not None else ("exact_match",)',
        'return ("exact_match",)',
        ("tests/test_evaluate.py::test_jsonl_scored_by_task_word",),
    ),
    Mutant(
        "an eval example that fails is dropped",
        "palikit/evaluate.py",
        "        yield [_record(pipe, examples[w.key], w, request, name, by_task, bench_metric, metric, codec)\n"
        "               for w, request in ready]",
        "        yield [r for r in (_record(pipe, examples[w.key], w, request, name, by_task, bench_metric, metric, codec)\n"
        "               for w, request in ready) if 'error' not in r]",
        ("tests/test_evaluate.py::test_an_example_that_fails_counts_as_wrong",),
    ),
    Mutant(
        "RefCOCO's bare-sentence answers read as text",
        "palikit/benchmarks.py",
        'label="answer", constants={"task": "segment"})',
        'label="answer")',
        ("tests/test_evaluate.py::test_refcoco_answers_are_parsed_as_segmentations",),
    ),
    Mutant(
        "keep_best keeps every evaluation",
        "palikit/finetune/recipe.py",
        'if best is None or (value < best["value"] if lower else value > best["value"]):',
        "if True:",
        (FT + "test_keep_best_and_early_stopping",),
    ),
    Mutant(
        "validation by exact match only",
        "palikit/finetune/recipe.py",
        "            out |= validation_values(rep)",
        '            out |= {k: v for k, v in validation_values(rep).items() if k.startswith("exact_match")}',
        (FT + "test_tiny_model_overfits_eight_examples",),
    ),
    Mutant(
        "int4 offset without the 8 levels below the midpoint",
        "palikit/quantize.py",
        "zero = low + 8 * scale",
        "zero = low",
        ("tests/test_quantize.py::test_int4_linear_is_its_dequantised_weight[int4-kernel-32]",
         "tests/test_quantize.py::test_bundled_model_stays_close_to_float32[int4-2.0]"),
    ),
    Mutant(
        "the int4 unpacking swaps each byte's halves",
        "palikit/quantize.py",
        "    torch.bitwise_and(high, 15, out=low)\n    high.bitwise_right_shift_(4).bitwise_and_(15)",
        "    low.copy_(high).bitwise_right_shift_(4).bitwise_and_(15)\n    high.bitwise_and_(15)",
        ("tests/test_quantize.py::test_int4_linear_is_its_dequantised_weight[dequantised-32]",
         "tests/test_quantize.py::test_int4_weight_unpacks_from_the_avx2_layout"),
    ),
    Mutant(
        "the int4 rows past the last whole block are unpacked as one",
        "palikit/quantize.py",
        "packed[whole * k // 2:].view(k, (n - whole) // 2).t()",
        "packed[whole * k // 2:].view((n - whole) // 2, k)",
        ("tests/test_quantize.py::test_int4_linear_is_its_dequantised_weight[dequantised-32]",
         "tests/test_quantize.py::test_int4_weight_unpacks_from_the_avx2_layout"),
    ),
    Mutant(
        "the dequantised int4 weight forgets its offsets",
        "palikit/quantize.py",
        "w.view(n, k // g, g).mul_(scales).add_(zeros)",
        "w.view(n, k // g, g).mul_(scales)",
        ("tests/test_quantize.py::test_int4_linear_is_its_dequantised_weight[dequantised-32]",),
    ),
    Mutant(
        "an int4 prompt runs the GEMV kernel",
        "palikit/quantize.py",
        "if self.block_rows and _dequantizes(",
        "if False and _dequantizes(",
        ("tests/test_quantize.py::test_int4_linear_is_its_dequantised_weight[dequantised-32]",),
    ),
    Mutant(
        "a quantised folder's packed tensor is used at an unaligned address",
        "palikit/weights.py",
        "state[name] = tensor.clone() if tensor.data_ptr() % ALIGNMENT else tensor",
        "state[name] = tensor",
        ("tests/test_quantize.py::test_quantized_folder_loads_without_quantising_again[int8]",),
    ),
    Mutant(
        "int8 weights truncated instead of rounded",
        "palikit/quantize.py",
        "q[start:start + rows] = (w / s[:, None]).round().clamp(-128, 127)",
        "q[start:start + rows] = (w / s[:, None]).clamp(-128, 127)",
        ("tests/test_quantize.py::test_int8_linear_is_its_dequantised_weight[int8-kernel]",),
    ),
    Mutant(
        "an int4 folder packed for another CPU is read anyway",
        "palikit/quantize.py",
        'if quantization["scheme"] == "int4" and quantization.get("packed_for", here) != here:',
        "if False:",
        ("tests/test_quantize.py::test_quantized_folder_loads_without_quantising_again[int4]",),
    ),
    Mutant(
        "the LM head is dequantised into the scratch too",
        "palikit/quantize.py",
        " and entries <= DEQUANTIZE_MAX_ENTRIES",
        "",
        ("tests/test_quantize.py::test_int8_embedding_looks_up_and_projects_the_same_table",),
    ),
    Mutant(
        "the dequantised int8 GEMM forgets the scales",
        "palikit/quantize.py",
        "        return F.linear(rows, _dequantized(weight, rows.dtype)).mul_(scales)",
        "        return F.linear(rows, _dequantized(weight, rows.dtype))",
        ("tests/test_quantize.py::test_int8_linear_is_its_dequantised_weight[dequantised]",),
    ),
    Mutant(
        "the int8 scratch keeps the previous layer's weight",
        "palikit/quantize.py",
        "    return _scratch_matrix(weight.shape, dtype).copy_(weight)",
        "    w = _scratch_matrix(weight.shape, dtype)\n    return w if w.any() else w.copy_(weight)",
        ("tests/test_quantize.py::test_int8_linear_is_its_dequantised_weight[dequantised]",),
    ),
    Mutant(
        "w8a8 rows truncated to int8 instead of rounded",
        "palikit/quantize.py",
        "return (x / row_scales).round_().clamp_(-127, 127), row_scales",
        "return (x / row_scales).clamp_(-127, 127), row_scales",
        ("tests/test_quantize.py::test_w8a8_linear_multiplies_int8_rows",
         "tests/test_generate.py::test_compiled_int8_keeps_greedy_text[materialised-w8a8]"),
    ),
    Mutant(
        "w8a8 products forget the rows' scales",
        "palikit/quantize.py",
        ".float().mul_(row_scales).mul_(scales.float())",
        ".float().mul_(scales.float())",
        ("tests/test_quantize.py::test_w8a8_linear_multiplies_int8_rows",),
    ),
    Mutant(
        "row blocks all written to the first rows",
        "palikit/gemma.py",
        "out[start:start + size] = y",
        "out[:size] = y",
        ("tests/test_quantize.py::test_w8a8_linear_multiplies_int8_rows",
         "tests/test_quantize.py::test_w8a8_prompts_run_their_feed_forward_in_row_blocks"),
    ),
    Mutant(
        "prefill runs its last layer on every slot",
        "palikit/generate.py",
        "x = lm.layers[-1](x, cos, sin, last_slot_masks, cache, 0, last_rows=1)",
        "x = lm.layers[-1](x, cos, sin, masks, cache, 0)",
        ("tests/test_generate.py::test_prefill_runs_the_last_layer_for_the_last_slot_alone[pg2]",),
    ),
    Mutant(
        "the last layer's values come from the last slot alone",
        "palikit/gemma.py",
        ("        v = self.v_proj(x).view(B, T, K, Dh).transpose(1, 2)\n        if last_rows is not None:\n"
         "            x, cos, sin, T = x[:, -last_rows:], cos[:, :, -last_rows:], sin[:, :, -last_rows:], last_rows\n"),
        ("        if last_rows is not None:\n"
         "            x, cos, sin, T = x[:, -last_rows:], cos[:, :, -last_rows:], sin[:, :, -last_rows:], last_rows\n"
         "        v = self.v_proj(x).view(B, T, K, Dh).transpose(1, 2)\n"),
        ("tests/test_generate.py::test_batch_equals_alone[pg1]", "tests/test_generate.py::test_batch_equals_alone[pg2]"),
    ),
    Mutant(
        "row blocks skip the last block",
        "palikit/gemma.py",
        "for start in range(0, n, size):",
        "for start in range(0, n - size, size):",
        ("tests/test_quantize.py::test_w8a8_linear_multiplies_int8_rows",
         "tests/test_quantize.py::test_w8a8_prompts_run_their_feed_forward_in_row_blocks"),
    ),
    Mutant(
        "w8a8 layers run a prompt's feed-forward halves whole",
        "palikit/quantize.py",
        "            layer.feed_forward_block_rows = INT8_ROWS_BLOCK",
        "            pass",
        ("tests/test_quantize.py::test_w8a8_prompts_run_their_feed_forward_in_row_blocks",),
    ),
    Mutant(
        "w8a8 layers multiply their rows unquantised",
        "palikit/quantize.py",
        "    if int8_rows:\n        return gemma.in_row_blocks(",
        "    if False:\n        return gemma.in_row_blocks(",
        ("tests/test_quantize.py::test_w8a8_linear_multiplies_int8_rows",),
    ),
    Mutant(
        "w8a8's linear layers take their rows unquantised",
        "palikit/quantize.py",
        "else Int8Linear(old, int8_rows))",
        "else Int8Linear(old))",
        ("tests/test_quantize.py::test_bundled_model_stays_close_to_float32[w8a8-1.5]",),
    ),
    Mutant(
        "the compiled w8a8 one-row product skips the rounding of its row",
        "palikit/quantize.py",
        "        if int8_rows:  # float32 sums",
        "        if False:  # float32 sums",
        ("tests/test_generate.py::test_compiled_int8_keeps_greedy_text[materialised-w8a8]",),
    ),
    Mutant(
        "the compiled w8a8 one-row product forgets its row's scale",
        "palikit/quantize.py",
        "sums = (weight.float() * row).sum(-1) * (scales.float() * row_scale)",
        "sums = (weight.float() * row).sum(-1) * scales.float()",
        ("tests/test_generate.py::test_compiled_int8_keeps_greedy_text[materialised-w8a8]",
         "tests/test_quantize.py::test_compiled_one_row_is_a_reduction_up_to_its_width_limit[w8a8]"),
    ),
    Mutant(
        "a compiled one-row int8 product of a long row stays inductor's slow reduction",
        "palikit/quantize.py",
        "            and weight.shape[1] <= MATERIALIZE_MAX_ROW):",
        "            ):",
        ("tests/test_quantize.py::test_compiled_one_row_is_a_reduction_up_to_its_width_limit[int8]",
         "tests/test_quantize.py::test_compiled_one_row_is_a_reduction_up_to_its_width_limit[w8a8]"),
    ),
    Mutant(
        "w8a8 leaves the vision tower in float",
        "palikit/quantize.py",
        "vision = vision or int8_rows",
        "vision = vision",
        ("tests/test_quantize.py::test_bundled_model_stays_close_to_float32[w8a8-1.5]",),
    ),
    Mutant(
        "w8a8's LM head takes its rows unquantised",
        "palikit/quantize.py",
        "Int8Embedding(model.language_model.embed_tokens, int8_rows)",
        "Int8Embedding(model.language_model.embed_tokens)",
        ("tests/test_quantize.py::test_bundled_model_stays_close_to_float32[w8a8-1.5]",),
    ),
    Mutant(
        "quantize leaves the LM head in full precision",
        "palikit/quantize.py",
        "    model.language_model.embed_tokens = Int8Embedding(model.language_model.embed_tokens, int8_rows)\n",
        "",
        ("tests/test_quantize.py::test_bundled_model_stays_close_to_float32[int8-0.5]",),
    ),
    Mutant(
        "a quantised model is saved as if it were not",
        "palikit/api.py",
        "        if self.config.quantization:\n",
        "        if False:\n",
        ("tests/test_quantize.py::test_errors",),
    ),
    Mutant(
        "LoRA adapters saved under palikit's module names",
        "palikit/finetune/model.py",
        "renamed[_PEFT_PREFIX + palikit_to_transformers_module(name) + rest] = tensor",
        "renamed[_PEFT_PREFIX + name + rest] = tensor",
        (FT + "test_lora_adapter_loads_in_transformers_and_peft",),
    ),
    Mutant(
        "load_adapter matches targets by palikit's names only",
        "palikit/finetune/model.py",
        "targets = [n for n in linear if check_target_module_exists(config, palikit_to_transformers_module(n))",
        "targets = [n for n in linear if False",
        (FT + "test_merge_lora", FT + "test_lora_adapter_loads_in_transformers_and_peft"),
    ),
    Mutant(
        "train starts on data with errors",
        "palikit/finetune/recipe.py",
        "if not cfg.allow_data_errors and (problem := data_errors(",
        "if False and (problem := data_errors(",
        (FT + "test_train_refuses_bad_data_before_the_model_loads",
         CLI + "test_train_verb_takes_overrides_resume_and_smoke"),
    ),
    Mutant(
        "train ignores --allow-data-errors",
        "palikit/cli.py",
        '(["allow_data_errors=true"] if args.allow_data_errors else [])',
        "[]",
        (CLI + "test_train_verb_takes_overrides_resume_and_smoke",),
    ),
    Mutant(
        "data check stops at the first bad COCO box",
        "palikit/data.py",
        "        if errors is None and error:",
        "        if error:",
        ("tests/test_data.py::test_data_check_reports_coco_annotation_problems_and_goes_on",),
    ),
    Mutant(
        "box past the image edge clipped without a word",
        "palikit/data.py",
        'problem(where, "box-outside",',
        'problem if False else (lambda *a, **k: None)(where, "box-outside",',
        ("tests/test_data.py::test_data_check_reports_coco_annotation_problems_and_goes_on",),
    ),
    Mutant(
        "data check ignores --image-dir",
        "palikit/cli.py",
        "codec=args.vae, image_dir=args.image_dir)",
        "codec=args.vae, image_dir=None)",
        ("tests/test_data.py::test_data_check_reports_coco_annotation_problems_and_goes_on",),
    ),
    Mutant(
        "FSDP refuses a bfloat16 base with float32 adapters again",
        "palikit/finetune/recipe.py",
        "            for layer in [*core.vision_tower.encoder.layers, *core.language_model.layers]:\n"
        "                fully_shard(layer)",
        "            if len({p.dtype for p in model.parameters()}) > 1:\n"
        "                raise ConfigError(\"FSDP shards layers of one weight dtype\")\n"
        "            for layer in [*core.vision_tower.encoder.layers, *core.language_model.layers]:\n"
        "                fully_shard(layer)",
        (FT + "test_fsdp_trains_the_shipped_lora_recipe",),
    ),
    Mutant(
        "a datasets folder read as palikit's own layouts",
        "palikit/data.py",
        "    if hf_dataset_kind(path) is not None:\n        return read_hf_dataset(path, split, columns)",
        "    pass",
        ("tests/test_data.py::test_hugging_face_datasets_sources[disk]",
         "tests/test_data.py::test_hugging_face_datasets_sources[parquet]", FT + "test_train_from_a_datasets_folder"),
    ),
    Mutant(
        "datasets parquet split files ignored",
        "palikit/data.py",
        "chosen = next((f for f in by_split.values() if f), [str(f) for f in files])",
        "chosen = [str(f) for f in files]",
        ("tests/test_data.py::test_hugging_face_datasets_sources[parquet]",),
    ),
    Mutant(
        "a resumed run starts a new MLflow run",
        "palikit/finetune/recipe.py",
        "run = mlflow.start_run(run_id=id_file.read_text().strip() if id_file.exists() else None,",
        "run = mlflow.start_run(run_id=None,",
        (FT + "test_metrics_reach_wandb_and_mlflow_offline",),
    ),
    Mutant(
        "W&B gets no numbers",
        "palikit/finetune/recipe.py",
        "        self.run.log(values, step=step)",
        "        pass",
        (FT + "test_metrics_reach_wandb_and_mlflow_offline",),
    ),
    Mutant(
        "a quantised folder's scales converted to the load dtype",
        "palikit/quantize.py",
        'packed = lambda name, t: not t.is_floating_point() or name.endswith(("scales", "scales_and_zeros"))',
        "packed = lambda name, t: not t.is_floating_point()",
        ("tests/test_quantize.py::test_quantized_folder_loads_without_quantising_again[int8]",),
    ),
    Mutant(
        "an example over the length limit stops the evaluation",
        "palikit/evaluate.py",
        "        except InputError as e:  # a newline in the prefix, or too long for the model",
        "        except KeyError as e:",
        ("tests/test_evaluate.py::test_an_overlong_prompt_fails_alone_in_its_batch",),
    ),
    Mutant(
        "run and eval records come out as they finish, not in order",
        "palikit/engine.py",
        "            while pending and (pending[0][1] is None or pending[0][1].done):\n"
        "                ready.append(pending.popleft())",
        "            ready = [e for e in pending if e[1] is None or e[1].done]\n"
        "            for e in ready:\n                pending.remove(e)",
        (ENGINE + "test_engine_thread_and_in_order[pg1]", API + "test_run_reports_bad_lines_and_goes_on"),
    ),
    Mutant(
        "run and eval submit everything at once",
        "palikit/engine.py",
        "            while more and len(pending) < window:",
        "            while more:",
        (ENGINE + "test_engine_thread_and_in_order[default]",),
    ),
    Mutant(
        "every torchrun rank runs every job",
        "palikit/jobs.py",
        " and (n - 1) % world == rank]",
        "]",
        (API + "test_run_under_torchrun_equals_one_process",),
    ),
    Mutant(
        "run leaves the ranks' files unmerged",
        "palikit/jobs.py",
        '        merge_rank_files(output_path, "line")',
        "        pass",
        (API + "test_run_under_torchrun_equals_one_process",),
    ),
    # ---- FlexAttention ----
    Mutant(
        "FlexAttention without the soft-cap",
        "palikit/gemma.py",
        "score_mod=_softcap(cap) if cap else None",
        "score_mod=None",
        ("tests/test_flex_attention.py::test_teacher_forced_equals_eager[pg2]",),
    ),
    Mutant(
        "FlexAttention's sliding layers see every key",
        "palikit/gemma.py",
        "        return {name: block_mask(m) for name, m in masks.items()}",
        '        return {name: block_mask(masks["global"]) for name in masks}',
        ("tests/test_flex_attention.py::test_teacher_forced_equals_eager[pg2]",),  # a prompt is one block: no window
    ),
    Mutant(
        "palikit.load ignores attention",
        "palikit/api.py",
        "    model.language_model.attention = attention\n",
        "",
        ("tests/test_flex_attention.py::test_load_and_cli_choose_the_kernel",),
    ),
    # ---- compiled decode (torch.compile) ----
    Mutant(
        "the compiled step rounds bf16 intermediates its own way",
        "palikit/generate.py",
        '"emulate_precision_casts": True,',
        '"emulate_precision_casts": False,',
        ("tests/test_generate.py::test_compiled_int8_keeps_greedy_text[fused-int8]",),
    ),
    Mutant(
        "a materialised row is uninitialised memory",
        "palikit/gemma.py",
        "    return x.clone()",
        "    return torch.empty_like(x)",
        ("tests/test_generate.py::test_compiled_decode_equals_eager[pg2-materialised]",
         "tests/test_generate.py::test_compiled_int8_keeps_greedy_text[materialised-int8]"),
    ),
    Mutant(
        "every compiled model shares decode_logits' code object",
        "palikit/generate.py",
        "code = decode_logits.__code__.replace()",
        "code = decode_logits.__code__",
        ("tests/test_generate.py::test_compiled_models_of_every_kind_in_one_process",),
    ),
    Mutant(
        "the compiled int8 one-row product forgets the scales",
        "palikit/quantize.py",
        "sums = (weight.float() * row).sum(-1) * (scales.float() * row_scale)",
        "sums = (weight.float() * row).sum(-1) * row_scale",
        ("tests/test_generate.py::test_compiled_int8_keeps_greedy_text[materialised-int8]",
         "tests/test_quantize.py::test_compiled_one_row_is_a_reduction_up_to_its_width_limit[int8]"),
    ),
    Mutant(
        "a decode step attends to the next, unwritten cache slot",
        "palikit/generate.py",
        "q_block, q_pos = block[rows, slot][:, None], pos[rows, slot][:, None]",
        "q_block, q_pos = (block[rows, slot] + 1)[:, None], pos[rows, slot][:, None]",
        ("tests/test_generate.py::test_unwritten_cache_slots_are_never_read[pg1-compiled]",
         "tests/test_generate.py::test_unwritten_cache_slots_are_never_read[pg2-compiled]"),
    ),
    Mutant(
        "compiled caches are not rounded up to a shared length",
        "palikit/generate.py",
        "    if getattr(model, \"compiled_decode\", None) is None:\n        return max_new_tokens",
        "    if True:\n        return max_new_tokens",
        ("tests/test_generate.py::test_compiled_decode_equals_eager[pg1-fused]",),
    ),
    Mutant(
        "--compile is not passed on",
        "palikit/cli.py",
        '"compile": args.compile, "attention": args.attention',
        '"attention": args.attention',
        (CLI + "test_compile_flag_gives_the_same_text",),
    ),
    Mutant(
        name="engine: a moved row leaves its cache behind",
        path="palikit/engine.py",
        old="                layer[dst] = layer[src]",
        new="                pass",
        tests=(ENGINE + "test_greedy_equals_alone_whatever_the_arrival[default-0]",
               ENGINE + "test_greedy_equals_alone_whatever_the_arrival[pg1-2]"),
    ),
    Mutant(
        name="engine: a reused row keeps the old occupant's layout",
        path="palikit/engine.py",
        old="self.block[rows], self.pos[rows], self.valid[rows] = p.batch.block, p.batch.pos, p.batch.valid",
        new="self.block[rows], self.pos[rows] = p.batch.block, p.batch.pos\n"
            "        self.valid[rows] |= p.batch.valid",
        tests=(ENGINE + "test_reused_rows_never_read_what_they_held[pg1]",
               ENGINE + "test_reused_rows_never_read_what_they_held[default]"),
    ),
    Mutant(
        name="engine: the first decode overwrites the prompt's last slot",
        path="palikit/engine.py",
        old="        self.slot[rows] = p.batch.prompt_len\n",
        new="        self.slot[rows] = p.batch.prompt_len - 1\n",
        tests=(ENGINE + "test_greedy_equals_alone_whatever_the_arrival[pg1-0]",
               ENGINE + "test_stops_at_eos_as_alone[default]"),
    ),
    Mutant(
        name="engine: the image cache keys images by their shape",
        path="palikit/engine.py",
        old="keys = [hashlib.sha256(p.numpy().tobytes()).digest() for p in pixels]",
        new="keys = [hashlib.sha256(str(p.shape).encode()).digest() for p in pixels]",
        tests=(ENGINE + "test_greedy_equals_alone_whatever_the_arrival[default-1]",
               ENGINE + "test_image_cache_is_bounded_in_bytes[pg1]"),
    ),
    Mutant(
        name="engine: the image cache never evicts",
        path="palikit/engine.py",
        old="        while self.bytes > self.max_bytes:",
        new="        while False:",
        tests=(ENGINE + "test_image_cache_is_bounded_in_bytes[default]",),
    ),
    Mutant(
        name="engine: one generator for every sampled row",
        path="palikit/engine.py",
        old="r.generator = gen.new_generator(self.model.device, r.sampling.seed)",
        new="r.generator = self.__dict__.setdefault('g', gen.new_generator(self.model.device, r.sampling.seed))",
        tests=(ENGINE + "test_seeded_sampling_is_reproducible_per_request[default]",
               ENGINE + "test_seeded_sampling_is_reproducible_per_request[pg1]"),
    ),
    Mutant(
        name="engine: a cancelled request keeps its row",
        path="palikit/engine.py",
        old="""            if r.cancelled:
                r.finish_reason = "cancelled"
                continue
""",
        new="",
        tests=(ENGINE + "test_cancel_frees_the_row[default]",),
    ),
    Mutant(
        name="engine: the prefill budget is ignored",
        path="palikit/engine.py",
        old="                if newcomers and (len(r.prompt_ids) > budget or r.alone):",
        new="                if newcomers and r.alone:",
        tests=(ENGINE + "test_prefill_budget_admits_one_long_prompt_per_step[pg1]",),
    ),
    Mutant(
        name="engine: a long prompt is prefilled in one step",
        path="palikit/engine.py",
        old="        per_step = max(1, n_layers * self.prefill_tokens // (m * P))",
        new="        per_step = n_layers",
        tests=(ENGINE + "test_a_long_prefill_runs_layer_by_layer_beside_decoding[pg1]",),
    ),
    Mutant(
        name="engine: a prefilled group joins where it was, not after the running rows",
        path="palikit/engine.py",
        old="            if p.start + j != n + j:",
        new="            if False:",
        tests=(ENGINE + "test_a_long_prefill_runs_layer_by_layer_beside_decoding[default]",),
    ),
    Mutant(
        name="engine: one bad newcomer fails the others",
        path="palikit/engine.py",
        old="            if len(newcomers) == 1:\n                newcomers[0]._finish(None, e)\n",
        new="            if True:\n                [r._finish(None, e) for r in newcomers]\n",
        tests=(ENGINE + "test_budgets_and_bad_requests[pg1]",),
    ),
]


@contextlib.contextmanager
def working_copy(tests_from: str | None) -> Iterator[Path]:
    """The working tree as git sees it (tracked and untracked, not ignored; no .venv) in a temporary
    folder, with the tests/ folder of revision `tests_from` if given."""
    with tempfile.TemporaryDirectory(prefix="palikit-mutant-") as tmp:
        work = Path(tmp)
        files = (
            subprocess.run(
                ["git", "ls-files", "-co", "--exclude-standard", "-z"],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            .stdout.decode()
            .split("\0")
        )
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, work / name)
        if tests_from:
            shutil.rmtree(work / "tests")
            archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, capture_output=True)
            if archive.returncode:
                raise SystemExit(f"mutants: no tests/ at {tests_from}: {archive.stderr.decode().strip()}")
            subprocess.run(["tar", "x"], cwd=work, input=archive.stdout, check=True)
        yield work


def node_id(case: ET.Element) -> str:
    """A junit testcase as pytest's node id: classname 'tests.test_api[.TestX]' + name."""
    parts = case.get("classname", "").split(".")
    module = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    return "::".join(["/".join(parts[: module + 1]) + ".py", *parts[module + 1 :], case.get("name", "")])


def run_pytest(work: Path, python: str, tests: list[str]) -> tuple[str, dict[str, str]]:
    """("ok" | "ERROR: ..." | "HUNG", {node id: "passed" | "failed" | "skipped"})."""
    report = work / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its own group: kill what it started too
    try:
        output, _ = proc.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "HUNG", {}
    if proc.returncode not in (0, 1) or not report.exists():
        lines = [line for line in output.splitlines() if line.strip()]
        return "ERROR: " + (lines[-1] if lines else f"pytest exited with {proc.returncode}"), {}
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        bad = case.find("failure") is not None or case.find("error") is not None
        outcomes[node_id(case)] = (
            "failed" if bad else "skipped" if case.find("skipped") is not None else "passed"
        )
    return "ok", outcomes


def run(mutant: Mutant, python: str, tests_from: str | None) -> tuple[str, str]:
    with working_copy(tests_from) as work:
        target = work / mutant.path
        mutated = mutant.apply(target.read_text())
        if mutated is None:
            return "STALE", f"{mutant.path} does not hold each text exactly once"
        target.write_text(mutated)
        status, outcomes = run_pytest(work, python, list(mutant.tests))
    if status != "ok":
        return status.split(":")[0], status.partition(": ")[2]
    if missing := [t for t in mutant.tests if t not in outcomes]:
        return "ERROR", f"not run: {', '.join(missing)}"
    if survivors := [t for t in mutant.tests if outcomes[t] != "failed"]:
        return "SURVIVED", f"{outcomes[survivors[0]]} on broken code: {', '.join(survivors)}"
    return "killed", f"{len(mutant.tests)} test(s) failed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("words", nargs="*", help="run only mutants whose name contains one of these")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--tests-from", metavar="REV", help="run the tests/ of this git revision instead")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.words or any(w in m.name for w in args.words)]
    if args.list:
        for m in chosen:
            print(f"{m.name:48} {m.path:24} {' '.join(m.tests)}")
        return 0
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
    start = time.perf_counter()
    with working_copy(args.tests_from) as work:
        status, outcomes = run_pytest(work, python, tests)
    failing = [t for t in tests if outcomes.get(t) != "passed"]
    print(
        f"baseline  {len(tests) - len(failing)} of {len(tests)} tests pass on the unmutated code "
        f"{time.perf_counter() - start:6.0f} s",
        flush=True,
    )
    if status != "ok" or failing:
        print(f"baseline failed ({status}); not passing: {', '.join(failing) or '-'}")
        if not args.tests_from:  # an older tests/ may lack some tests: report the mutants anyway
            return 1
    bad = 0
    for m in chosen:
        start = time.perf_counter()
        verdict, detail = run(m, python, args.tests_from)
        bad += verdict != "killed"
        print(f"{verdict:9} {m.name:48} {time.perf_counter() - start:6.0f} s  {detail}", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
