"""HTTP server: OpenAI-compatible chat completions, native task endpoints, request batching, a web demo.

    palikit serve --model google/paligemma2-3b-mix-224 [--host 127.0.0.1] [--port 8000] [--api-key KEY]

or from Python: `create_app(palikit.load(...), ServerSettings(...))` gives a FastAPI app; `serve(model,
options, settings)` runs it with uvicorn.

Endpoints (request and response schemas at /docs and /openapi.json):

    POST /v1/chat/completions   OpenAI's vision schema; the `openai` client works unchanged. The LAST user
                                message is the request: its text parts, joined by spaces, are the PaliGemma
                                prefix ("caption en", "detect cat ; dog"), with no chat template; its
                                image_url parts are the images. Earlier messages are ignored. max_tokens /
                                max_completion_tokens, temperature (omitted or 0: greedy), top_p, seed,
                                stream (SSE chunks, then `data: [DONE]`), stream_options.include_usage.
    POST /v1/caption, /v1/ask, /v1/question, /v1/ocr, /v1/detect, /v1/segment (one per task of
         tasks.TASKS), /v1/predict
                                native, JSON in and out: {"image": "<base64 or data: URL>", ...task fields}
                                -> {"task", "prompt", "text", "width", "height", "objects", ...}; objects have
                                pixel boxes [x1, y1, x2, y2], a confidence (geometric-mean token
                                probability), its logprob and, for segment, a COCO RLE mask of the
                                whole image. /v1/predict takes any prompt.
    GET  /v1/models, /health, /tasks (the task list the web demo shows), /metrics (Prometheus text), /docs,
         / (the web demo), /sample.png (the image the demo opens with)

Batching: continuous (palikit.engine). One model thread decodes a token for every running request per
step, up to max_batch rows (or as many as kv_cache_gb holds); a new request joins between steps and
leaves the moment it is done, so a short `ocr` never waits for a long `describe`. Streaming, seeded and
greedy requests all share the steps, each with its own sampling and seed, and each answer is the one the
request gets alone: the same tokens, log-probs to float rounding; bit for bit with --batch-invariant (each
prompt prefilled alone, every step of all max_batch rows, at a cost in throughput). Images are encoded once while they stay in the image cache (image_cache_mb), so
captioning, then detecting, then segmenting one photo encodes it once. Requests beyond max_queue waiting
get 503 + Retry-After. The event loop never runs the model.

Safety: binds 127.0.0.1 unless told otherwise; optional API key (`Authorization: Bearer KEY`) on /v1/*;
request bodies over max_body_bytes get 413 and images over max_image_pixels 413 before decoding;
server-side file paths and URL fetching are refused (400) unless enabled; a body must arrive within
BODY_TIMEOUT_S (408) and an answer within request_timeout_s (504). Errors are JSON,
{"error": {"message": ..., "type": ...}}, and never stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, HTTPException, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import tasks
from ..api import Pipeline
from ..engine import batch_invariant
from ..options import Options, ServerSettings
from ..processor import InputError
from ..weights import CheckpointError
from .batcher import Batcher, Job
from .guard import Guard
from .images import ImageReader, ImageSize
from .prometheus import Metrics
from .schema import (ERROR_TYPES, AdapterRequest, ChatCompletion, ChatMessageOut, ChatRequest, Choice, ErrorResponse,
                     ImagePart, ImageRequest, ModelCard, ModelList, PredictRequest, TaskResponse, TextPart, Usage,
                     VideoPart, VideoURL, error_response, task_request)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
SAMPLE_SEED = 30  # two green circles and a blue triangle, in 1.3 kB
DOCS_ASSETS = "/docs-assets"  # where fastapi-offline serves Swagger UI's and ReDoc's files


# ----------------------------------------------------------------------------- request handling


def _sampling(temperature: float | None, top_p: float | None, top_k: int = 0, seed: int | None = None
              ) -> dict:
    """A request's sampling arguments (generate.SamplingConfig): greedy unless a temperature > 0 is given."""
    if not temperature:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p or 1.0, "top_k": top_k,
            "seed": seed}


def _bad_request(fn, *args, **kwargs):
    """Call a prompt builder; its ValueError (bad language, empty label...) is the client's error."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise HTTPException(400, str(e)) from None


def _as_http(e: Exception) -> HTTPException:
    if isinstance(e, HTTPException):
        return e
    if isinstance(e, ValueError):  # InputError, SamplingConfig: what the request asked for is invalid
        return HTTPException(400, str(e))
    return HTTPException(500, f"internal error ({type(e).__name__}); see the server log")


def n_frames(media: list) -> int:
    """The images a request's media make (a video: its frames), known before any is decoded."""
    return sum(item.frames if isinstance(item, VideoURL) else 1 for item in media)


def openai_finish_reason(reason: str) -> str:
    """OpenAI's name for a finish reason: "stop" for <eos> and stop strings alike ("length" as is);
    palikit's own endpoints keep "eos" and "stop" apart."""
    return "length" if reason == "length" else "stop"


class Server:
    """Settings, the batcher, the image reader and the metrics of one app; the routes call into it."""

    def __init__(self, pipe: Pipeline, settings: ServerSettings):
        self.pipe, self.settings = pipe, settings
        self.model_name = settings.model_name or "palikit"
        self.request_timeout_s, self.check_prompts = settings.request_timeout_s, settings.check_prompts
        self.metrics = Metrics()
        self.batcher = Batcher(pipe, self.metrics, settings.max_batch, settings.max_queue,
                               kv_cache_gb=settings.kv_cache_gb, image_cache_mb=settings.image_cache_mb,
                               max_len=settings.max_len, batch_invariant=batch_invariant(pipe, default=False))
        self.images = ImageReader(max_bytes=settings.max_body_bytes, max_pixels=settings.max_image_pixels,
                                  allow_local_paths=settings.allow_local_paths or False,
                                  allow_urls=settings.allow_urls, allow_private_urls=settings.allow_private_urls,
                                  prepare=pipe.prepare_image, read_clip=pipe.read_video)
        self.can_mask = pipe.codec_path is not None
        self.created = int(time.time())
        self.paths: set[str] = set()  # the app's routes, for the metrics labels (filled by create_app)
        self.draining: set[str] = set()  # adapters being unloaded: no new requests
        named = [spec.partition("=")[::2] for spec in settings.adapters]
        if settings.adapters_dir:
            named += sorted((p.name, str(p)) for p in Path(settings.adapters_dir).iterdir() if p.is_dir())
        for name, folder in named:  # at startup: a bad one stops the server with its one line
            self.load_adapter(name, folder)

    # ---- adapters

    def load_adapter(self, name: str, folder: str) -> None:
        if name == self.model_name:
            raise InputError(f"adapter name {name!r} is the base model's")
        self.pipe.load_adapter(name, folder, max_adapters=self.settings.max_adapters)

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a request names (None: the base); 404 for a name nothing is served under."""
        if model is None or model == self.model_name:
            return None
        bank = self.pipe.adapters
        if bank is None or model not in bank.adapters or model in self.draining:
            served = [self.model_name, *(n for n in (bank.adapters if bank else ()) if n not in self.draining)]
            raise HTTPException(404, f"The model {model!r} does not exist: this server serves "
                                     f"{', '.join(map(repr, served))}")
        return model

    async def unload_adapter(self, name: str) -> None:
        """Stop taking requests for the adapter, let those in flight finish, then unload it."""
        self.adapter_of(name)
        if name is None or name == self.model_name:
            raise HTTPException(400, f"{name!r} is the base model, which cannot be unloaded")
        self.draining.add(name)
        try:
            while self.batcher.engine.uses_adapter(name):
                await asyncio.sleep(0.02)
            self.pipe.unload_adapter(name)
        finally:
            self.draining.discard(name)

    # ---- prompts and jobs

    async def read_media(self, media: list) -> tuple[list, ImageSize, list[float] | None]:
        """Images (references) and videos (VideoURL) -> every image and frame in order, the size of
        the first (boxes are in its pixels: a video's as stored), and a video's frame times."""
        images, sizes, times = [], [], None
        for item in media:
            if isinstance(item, VideoURL):
                clip, size = await self.images.read_video(item.url, item.frames, item.stride)
                images += clip.frames
                sizes.append(size)
                times = (times or []) + clip.times
            else:
                (image,), size = await self.images.read([item])
                images.append(image)
                sizes.append(size)
        return images, sizes[0], times

    def check(self, prompt: str, n_images: int, max_new_tokens: int) -> int:
        """Validate a prompt before it queues; -> its length in tokens (images included)."""
        if self.check_prompts:
            _bad_request(tasks.parse_task, prompt)
        try:
            n = len(self.pipe.prompt_ids(prompt, n_images, max_new_tokens))
            self.batcher.check(n, max_new_tokens)  # the engine's rows (--max-len), before decoding
            return n
        except InputError as e:
            raise HTTPException(400, str(e)) from None

    def submit(self, images, size: ImageSize, prompt: str, max_new_tokens: int, sampling: dict,
               parse: tasks.TaskSpec | None = None, stream: bool = False, stop: list[str] = (),
               logprobs: bool = False, adapter: str | None = None) -> Job:
        if parse is not None and parse.masks and not self.can_mask:
            raise HTTPException(501, "segmentation masks are not available: this server has no mask codec "
                                     "(mask_codec.npz / vae-oid.npz beside the model)")
        loop = asyncio.get_running_loop()
        job = Job(images, size, prompt, max_new_tokens, sampling, parse, stream,
                  time.monotonic() + self.request_timeout_s, asyncio.Queue(), loop, tuple(stop), logprobs=logprobs,
                  adapter=adapter, model=adapter or self.model_name)
        self.batcher.submit(job)
        return job

    async def next_event(self, job: Job) -> tuple[str, Any]:
        try:
            return await asyncio.wait_for(job.out.get(), max(0.0, job.deadline - time.monotonic()))
        except TimeoutError:
            job.cancel()
            raise HTTPException(504, f"no answer within {self.request_timeout_s:g} s; the server is busy "
                                     "or the request asks for too many tokens") from None

    async def result(self, job: Job) -> dict:
        try:
            kind, payload = await self.next_event(job)
        finally:
            job.cancel()  # a no-op once answered; otherwise the model skips it
        if kind == "error":
            raise _as_http(payload)
        return payload

    async def sse(self, job: Job, prompt_tokens: int, include_usage: bool):
        """OpenAI's chat.completion.chunk events, then `data: [DONE]`."""
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": job.model}

        def event(body: dict) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def chunk(delta: dict, finish: str | None = None) -> str:
            return event(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    kind, payload = await self.next_event(job)
                except HTTPException as e:
                    kind, payload = "error", e
                if kind == "delta":
                    yield chunk({"content": payload})
                    continue
                if kind == "done":
                    yield chunk({}, openai_finish_reason(payload["finish_reason"]))
                    if include_usage:
                        n = payload["completion_tokens"]
                        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                 "total_tokens": prompt_tokens + n}
                        yield event(head | {"choices": [], "usage": usage})
                else:  # headers are sent already: the error travels as an event, as OpenAI's does
                    e = _as_http(payload)
                    yield event({"error": {"message": e.detail,
                                           "type": ERROR_TYPES.get(e.status_code, "error")}})
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away mid-stream: stop generating


def _last_user_message(req: ChatRequest) -> tuple[str, list[str | VideoURL]]:
    """-> (prompt, image references and videos) of the last user message."""
    user = [m for m in req.messages if m.role == "user"]
    if not user:
        raise HTTPException(400, "messages need a user message with the image(s) and the PaliGemma prompt")
    content = user[-1].content or []
    if isinstance(content, str):
        content = [TextPart(type="text", text=content)]
    prompt = " ".join(p.text.strip() for p in content if isinstance(p, TextPart) and p.text.strip())
    refs = [(p.image_url if isinstance(p.image_url, str) else p.image_url.url) if isinstance(p, ImagePart)
            else VideoURL(url=p.video_url) if isinstance(p.video_url, str) else p.video_url
            for p in content if isinstance(p, (ImagePart, VideoPart))]
    if not prompt:
        raise HTTPException(400, 'the user message needs a text part with the PaliGemma prompt, '
                                 'e.g. "caption en"')
    if not refs:
        raise HTTPException(400, "the user message needs an image_url (or video_url) part: PaliGemma answers about "
                                 "images")
    return prompt, refs


# ----------------------------------------------------------------------------- the app


def create_app(pipe: Pipeline, settings: ServerSettings | None = None, **changes) -> FastAPI:
    """The FastAPI app serving `pipe`, with `settings` (ServerSettings, or its fields as keywords).
    There is a route /v1/<verb> per task of tasks.TASKS, and /tasks lists them for the web demo."""
    settings = dataclasses.replace(settings or ServerSettings(), **changes)
    api_key = settings.api_key
    server = Server(pipe, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        server.batcher.close()

    # fastapi-offline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from the package, not
    # a CDN, so they work on a machine without network.
    app = FastAPIOffline(title="palikit", summary="PaliGemma served: OpenAI-compatible and native task endpoints",
                         description=(__doc__ or "").split("\n\n", 2)[-1], lifespan=lifespan, static_url=DOCS_ASSETS)
    app.state.palikit = server
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=settings.max_body_bytes, metrics=server.metrics,
                       paths=server.paths)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        errs = e.errors()
        if errs and errs[0]["type"] == "json_invalid":
            reason = errs[0].get("ctx", {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON ({reason})")
        where = [".".join(str(x) for x in err["loc"] if x != "body") or "body" for err in errs[:3]]
        parts = [f"{w}: {err['msg']}" for w, err in zip(where, errs)]
        return error_response(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error ({type(e).__name__}); see the server log")

    errors = {code: {"model": ErrorResponse} for code in (400, 401, 413, 503, 504)}
    auth = [Security(HTTPBearer(auto_error=False))] if api_key else []  # documents the key in the schema
    v1 = APIRouter(prefix="/v1", dependencies=auth, responses=errors)

    @v1.get("/models", response_model=ModelList)
    async def models():
        base = ModelCard(id=server.model_name, created=server.created, options=pipe.options.to_dict())
        loaded = pipe.adapters.adapters if pipe.adapters is not None else {}
        return ModelList(data=[base, *(ModelCard(id=name, created=server.created, parent=server.model_name)
                                       for name in loaded if name not in server.draining)])

    @v1.post("/adapters", response_model=ModelCard, status_code=201,
             summary="load a LoRA adapter from a folder on the server (needs --allow-local-paths)")
    async def load_adapter(req: AdapterRequest):
        if not settings.allow_local_paths:
            raise HTTPException(403, "loading adapters by path needs the server's --allow-local-paths DIR")
        folder = server.images.local_path(req.path, "adapter")  # inside the allowed folder, or 400
        bank = pipe.adapters
        if bank is not None and len(bank.adapters) >= settings.max_adapters:
            raise HTTPException(409, f"{len(bank.adapters)} adapters are loaded, the most this server takes "
                                     f"(--max-adapters {settings.max_adapters}); DELETE one first")
        try:
            await asyncio.to_thread(server.load_adapter, req.name, str(folder))
        except (InputError, CheckpointError) as e:
            raise HTTPException(409 if "loaded already" in str(e) else 400, str(e)) from None
        return ModelCard(id=req.name, created=server.created, parent=server.model_name)

    @v1.delete("/adapters/{name}", summary="unload a LoRA adapter once the requests running on it finish")
    async def unload_adapter(name: str):
        await server.unload_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    @v1.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "a chat.completion, or chat.completion.chunk events if stream"}})
    async def chat_completions(req: ChatRequest):
        adapter = server.adapter_of(req.model)
        if req.top_logprobs and not req.logprobs:
            raise HTTPException(400, "top_logprobs needs logprobs: true")
        if req.logprobs and req.stream:
            raise HTTPException(400, "logprobs is not supported with stream: true")
        prompt, refs = _last_user_message(req)
        max_new = req.max_completion_tokens or req.max_tokens or tasks.default_budget(prompt)
        n_prompt = server.check(prompt, n_frames(refs), max_new)  # cheap checks before decoding the images
        images, size, _ = await server.read_media(refs)
        sampling = _sampling(req.temperature, req.top_p, seed=req.seed) | {"top_logprobs": req.top_logprobs or 0}
        job = server.submit(images, size, prompt, max_new, sampling, stream=req.stream, stop=req.stop or (), adapter=adapter,
                            logprobs=req.logprobs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(server.sse(job, n_prompt, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        r = await server.result(job)
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=r["completion_tokens"],
                      total_tokens=n_prompt + r["completion_tokens"])
        choice = Choice(message=ChatMessageOut(content=r["text"]),
                        finish_reason=openai_finish_reason(r["finish_reason"]), logprobs=r.get("logprobs"))
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                              model=adapter or server.model_name, choices=[choice], usage=usage)

    async def run_task(req: ImageRequest, prompt: str, max_new: int | None) -> TaskResponse:
        max_new = max_new or tasks.default_budget(prompt)
        adapter = server.adapter_of(req.adapter)
        media = [req.image] if req.image is not None else [VideoURL(url=req.video, frames=req.frames, stride=req.stride)]
        n_prompt = server.check(prompt, n_frames(media), max_new)  # 400 for an unknown task unless check_prompts=False
        images, size, times = await server.read_media(media)
        spec = _spec_or_none(prompt)
        parse = spec if spec is not None and spec.parse is not None else None
        job = server.submit(images, size, prompt, max_new,
                            _sampling(req.temperature, req.top_p, req.top_k, req.seed), parse, adapter=adapter)
        r = await server.result(job)
        return TaskResponse(task=spec.name if spec else "free", prompt=prompt, text=r["text"], width=size.width,
                            height=size.height, objects=r.get("objects"), finish_reason=r["finish_reason"],
                            frame_times=times,
                            usage=Usage(prompt_tokens=n_prompt, completion_tokens=r["completion_tokens"],
                                        total_tokens=n_prompt + r["completion_tokens"]))

    def task_route(spec: tasks.TaskSpec) -> None:
        async def handler(req):
            values = {arg.name: getattr(req, arg.name) for arg in spec.args}
            return await run_task(req, _bad_request(spec.build, **values), req.max_new_tokens)

        param = inspect.Parameter("req", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=task_request(spec))
        handler.__signature__ = inspect.Signature([param])  # what FastAPI reads the body model from
        v1.post(f"/{spec.verb}", response_model=TaskResponse, name=spec.verb, summary=spec.help)(handler)

    for spec in tasks.TASKS.values():
        task_route(spec)

    @v1.post("/predict", response_model=TaskResponse, summary="any PaliGemma prompt")
    async def predict(req: PredictRequest):
        return await run_task(req, req.prompt.strip(), req.max_new_tokens)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        loaded = pipe.adapters.adapters if pipe.adapters is not None else {}
        return {"status": "ok", "model": server.model_name, "auth": bool(api_key),
                "queue_depth": server.batcher.depth, "max_batch": server.batcher.max_batch,
                "adapters": [n for n in loaded if n not in server.draining],  # the web demo's model menu
                # a request's room and an image's tokens: how many frames of a clip fit (the web demo)
                "max_len": server.batcher.max_len,
                "image_tokens": pipe.config.num_image_tokens}

    @app.get("/tasks")
    async def task_list():  # the web demo's menu; public like the page itself
        free = {"verb": "predict", "title": "free prompt", "help": "any PaliGemma prompt",
                "max_new_tokens": tasks.FREE_PROMPT_BUDGET,
                "objects": True, "arg": {"name": "prompt", "title": "Prompt", "example": "caption en",
                                         "required": True, "many": False}}
        return [spec.describe() for spec in tasks.TASKS.values()] + [free]

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return server.metrics.render(server.batcher.depth, server.batcher.gauges())

    @app.get("/", include_in_schema=False)
    async def demo():
        return FileResponse(STATIC / "index.html")

    @app.get("/sample.png", include_in_schema=False)
    async def sample():
        return Response(_sample_png(), media_type="image/png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    server.paths.update({route.path for route in v1.routes} | {"/health", "/tasks", "/metrics", "/", "/sample.png",
                                                               "/docs", "/redoc", "/docs/oauth2-redirect",
                                                               "/openapi.json"})
    return app


@functools.cache
def _sample_png() -> bytes:
    """The web demo's opening image, so that the page works before anything is uploaded: a scene of
    the synthetic shapes world, which the bundled default model was trained on."""
    import numpy as np

    from ..synthetic import make_scene

    out = io.BytesIO()
    make_scene(np.random.default_rng(SAMPLE_SEED), size=224, number_prob=0).image.save(out, "PNG")
    return out.getvalue()


def _spec_or_none(prompt: str) -> tasks.TaskSpec | None:
    try:
        return tasks.spec_of_prompt(prompt)
    except ValueError:
        return None


def serve(model: str = "default", options: Options | None = None, settings: ServerSettings | None = None) -> None:
    """Load `model` with `options` and serve it with uvicorn, with `settings`, until interrupted.

    settings.threads: torch's CPU threads; by default all cores but one, which the HTTP loop keeps
    (decoding images, parsing requests): with every core, the model's many short ops of continuous
    batching fight the loop for the CPU."""
    import uvicorn

    from ..api import load

    settings = settings or ServerSettings()
    torch.set_num_threads(settings.threads or server_threads())
    pipe = load(model, options)
    name = settings.model_name or (Path(model).name if Path(model).exists() else str(model))  # not the server's paths
    app = create_app(pipe, settings, model_name=name)
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", settings.host)
    where = f"http://{'[' + settings.host + ']' if ':' in settings.host else settings.host}:{settings.port}"
    print(f"palikit: serving {name} at {where}/ (the web demo; API docs at {where}/docs)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_keep_alive=5, log_level="info")


def server_threads() -> int:
    """All cores but one (see serve), at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


@contextlib.contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` with uvicorn in a thread (tests, notebooks, benchmarks); yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # port 0: the OS picks a free one, with no race
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="palikit-uvicorn",
                              daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start; see the log above")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
