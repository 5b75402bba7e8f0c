"""The ``overstory`` command and what only it does: the demo, booting the tree and
deploying apps (:mod:`.deploy`). It sits on top: it calls the client
(:mod:`overstory.runtime`) and starts the HTTP gateway; nothing below imports it.
Run it as ``overstory ...`` or ``python -m overstory.cli ...``."""
