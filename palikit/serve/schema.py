"""Request and response bodies of the server (OpenAI's chat schema and palikit's task endpoints),
and the JSON error body every failure gets."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, create_model, field_validator, model_validator

from .. import tasks
from ..scheduler import MAX_TOP_LOGPROBS, SEED_MAX, SEED_MIN
from ..video import NUM_FRAMES, STRIDE

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout", 413: "request_too_large",
               415: "invalid_request_error", 500: "server_error",
               501: "not_implemented", 503: "server_busy", 504: "timeout"}


class ErrorBody(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Sampling(BaseModel):
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy; > 0: sample at this temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (only when temperature > 0)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens, 0 = off (only when sampling)")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX,
                             description="reproducible sampling: the same seed samples the same answer")


class ImageRequest(Sampling):
    image: str | None = Field(None, description="the image as base64 or a data: URL (data:image/png;base64,...); "
                                                "an http(s) URL or a server-side path only where the operator "
                                                "enabled them")
    video: str | None = Field(None, description="instead of an image, a clip (mp4, webm, mov, mkv, animated GIF), "
                                                "given as an image is; its frames go before the prompt")
    frames: int = Field(NUM_FRAMES, ge=1, le=256, description="a video's frames")
    stride: int | None = Field(STRIDE, ge=1, description="every stride-th frame from the first, as "
                                                              "big_vision samples; null: evenly over the clip")

    @model_validator(mode="after")
    def one_image_or_video(self):
        if (self.image is None) == (self.video is None):
            raise ValueError("give an image or a video (one of them)")
        return self
    adapter: str | None = Field(None, description="a loaded LoRA adapter's name (GET /v1/models); omitted: the base")


class PredictRequest(ImageRequest):
    prompt: str = Field(description='a PaliGemma prefix, e.g. "caption en" or "detect cat ; dog"')
    max_new_tokens: int | None = Field(None, ge=1, description="default: the prompt's task's budget")


def task_request(spec: tasks.TaskSpec) -> type[ImageRequest]:
    """The request body of /v1/<verb>: the image, sampling, the task's fields, max_new_tokens."""
    fields: dict[str, Any] = {}
    for arg in spec.args:
        kind = (list[str] | str) if arg.many else Literal[arg.choices] if arg.choices else str
        fields[arg.name] = (kind, Field(... if arg.required else arg.default,
                                        description=arg.text.help or arg.text.title))
    fields["max_new_tokens"] = (int | None, Field(None, ge=1, description=spec.budget_help()))
    return create_model(f"{spec.verb.capitalize()}Request", __base__=ImageRequest, **fields)


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE, as pycocotools' mask.encode")


class DetectedObject(BaseModel):
    label: str
    box: list[float] = Field(description="pixels of the input image: x1, y1, x2, y2")
    confidence: float | None = Field(None, description="geometric-mean probability of the object's tokens, 0..1")
    logprob: float | None = Field(None, description="mean log-prob of the object's tokens (log of confidence)")
    codes: list[int] | None = Field(None, description="segment only: the 16 mask codes")
    mask: RLE | None = Field(None, description="segment only: the mask over the whole image")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TaskResponse(BaseModel):
    task: str
    prompt: str
    text: str = Field(description="the model's raw output")
    width: int
    height: int
    objects: list[DetectedObject] | None = Field(None, description="detect / segment only")
    frame_times: list[float] | None = Field(None, description="a video's chosen frames: their times (seconds)")
    finish_reason: Literal["eos", "stop", "length"] = Field(description="eos: the model ended its answer; stop: "
                                                            "a stop string; length: the token budget")
    usage: Usage


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


class VideoURL(BaseModel):
    url: str
    frames: int = Field(NUM_FRAMES, ge=1, le=256)
    stride: int | None = Field(STRIDE, ge=1)


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL | str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI chat fields that palikit does not do: a request naming one (not null) is a 400 that says so,
# not an answer that silently ignores it.
UNSUPPORTED_CHAT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                           "response_format", "logit_bias", "audio", "modalities", "prediction")


class ChatRequest(BaseModel):
    model: str | None = Field(None, description="the served model's id, or a loaded adapter's (GET /v1/models); "
                                                "omitted: the base model")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="takes precedence over max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="omitted or 0: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(None, ge=1, le=1, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings: the answer ends before the first "
                                                           "of them it contains (finish_reason stop)")
    logprobs: bool = Field(False, description="answer each token's log-prob (not with stream)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="and the log-probs of this many most likely tokens (needs logprobs)")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, body):
        if isinstance(body, dict):
            for name in UNSUPPORTED_CHAT_FIELDS:
                if body.get(name) is not None:
                    raise ValueError(f"{name} is not supported by this server (PaliGemma answers with text)")
        return body

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stop = [stop] if isinstance(stop, str) else stop or []
        if len(stop) > 4 or not all(stop):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: dict | None = None  # {"content": [{"token", "logprob", "bytes", "top_logprobs"}]} if asked


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "palikit"
    options: dict = {}  # how the model was loaded: palikit.options.Options
    parent: str | None = None  # an adapter's base model


class AdapterRequest(BaseModel):
    name: str = Field(description="the name requests will use (model / adapter)")
    path: str = Field(description="a peft adapter folder on the server, inside --allow-local-paths")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """{"error": {"message", "type"}}, as OpenAI's API answers errors."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error")}}
    return JSONResponse(body, status_code=status, headers=headers)
