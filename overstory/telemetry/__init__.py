"""Telemetry: GenAI-convention spans, opt-in export setup, and Ray metrics.

- :mod:`.spans` — ``invoke_agent``, ``chat`` and ``execute_tool`` spans, their attributes
  and events, and W3C context propagation across actor calls;
- :mod:`.setup` — a global tracer provider from the ``OTEL_*`` variables, installed only
  when the runtime is asked to (library code never installs one);
- :mod:`.metrics` — counters, histograms and gauges through ``ray.util.metrics``.

The package exports what each of the three modules exports (their ``__all__``).
"""

# The modules first, under private names: once ``from .metrics import *`` has run, the
# package's ``metrics`` is the function of that name, not the module.
from . import metrics as _metrics
from . import setup as _setup
from . import spans as _spans
from .metrics import *  # noqa: F403
from .setup import *  # noqa: F403
from .spans import *  # noqa: F403

__all__: list[str] = []
__all__ += _metrics.__all__
__all__ += _setup.__all__
__all__ += _spans.__all__
