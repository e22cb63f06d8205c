"""serve: `python -m gptneox.serve`, an OpenAI-compatible server with continuous batching (docs/serving.md).

    server.py  the command line: flags, the socket bound before the model loads, uvicorn
    app.py     the FastAPI endpoints over the batching engine (gptneox/generation/batching.py)
    api.py     the OpenAI request and response shapes
"""
