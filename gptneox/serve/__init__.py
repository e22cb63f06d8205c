"""serve: `python -m gptneox.serve`, an OpenAI-compatible server with continuous batching (docs/serving.md).

    server.py  the command line: flags, the socket bound before the model loads, uvicorn
    http.py    the FastAPI app: routes, error bodies, the API key, the request-size limit, the drain at SIGTERM
    metrics.py GET /metrics: Prometheus' counters, gauges and histograms (prometheus_client)
    app.py     the endpoints' service over the batching engine (gptneox/generation/batching.py)
    call.py    one HTTP request's engine requests (its choices) as an asyncio stream of events
    api.py     the OpenAI request and response shapes
"""
