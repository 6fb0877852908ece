"""palikit's HTTP server: `create_app(pipe)` gives a FastAPI app, `serve(...)` runs it with uvicorn.

    app.py      routes (OpenAI chat completions, /v1/<task> per registered task, /tasks, /health,
                /metrics, the web demo) and the Server that holds one app's settings
    schema.py   request and response bodies, the JSON error body
    batcher.py  the bounded queue and the model thread that runs requests in batches
    images.py   reading a request's images (base64, data: URLs, allowed paths/URLs), size caps
    guard.py    the outer ASGI layer: API key, body size and arrival time, request metrics
    metrics.py  Prometheus counters
"""

from .app import background, create_app, serve

__all__ = ["background", "create_app", "serve"]
