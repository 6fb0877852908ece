"""palikit's HTTP server: `create_app(pipe, settings)` gives a FastAPI app, `serve(model, options,
settings)` runs it with uvicorn (settings: palikit.options.ServerSettings).

    app.py         routes (OpenAI chat completions, /v1/<task> per registered task, /tasks, /health,
                   /metrics, the web demo) and the Server that holds one app's state
    schema.py      request and response bodies, the JSON error body
    batcher.py     requests as palikit.engine requests: streaming deltas, answers, 503 when full
    images.py      reading a request's images (base64, data: URLs, allowed paths/URLs), size caps
    guard.py       the outer ASGI layer: API key, body size and arrival time, request metrics
    prometheus.py  Prometheus counters
    static/        the web demo
"""

from ..options import ServerSettings
from .app import background, create_app, serve

__all__ = ["ServerSettings", "background", "create_app", "serve"]
