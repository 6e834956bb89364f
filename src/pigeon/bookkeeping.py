"""One shared, empty context for the event loop's bookkeeping callbacks.

`Future.add_done_callback` and `loop.call_soon` copy the current context for every callback
they are not given one for: a new object per callback, for the allocator and the collector
(a probe on `PyContext_CopyCurrent` counted ~22 per delivered message at 2000 msgs/s). The
callbacks that only drop a finished task from a set, forget a finished hand-over, write a
connection's queued frames (whose log lines name their device) or answer a store job's futures
read no context variable (the log context of `pigeon.logs` included): they share this one.
(Callbacks never nest, each runs from the loop's top, so one context can serve them all.)
"""

from __future__ import annotations

import contextvars

#: Pass as `context=` to callbacks that read no context variable.
BOOKKEEPING = contextvars.Context()
