"""The HTTP front door on Ray Serve: API keys, an OpenAI-shaped API, its deployment.

- :mod:`.keys` — API keys (made once, kept as a hash) and the :class:`Principal`;
- :mod:`.wire` — the Responses and Conversations shapes built from turns (pure);
- :mod:`.app` — the FastAPI app;
- :mod:`.serve` — the Ray Serve deployment and ``overstory serve --http``.

FastAPI and Ray Serve are imported only by :mod:`.app` and :mod:`.serve`.
"""
