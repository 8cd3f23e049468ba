"""Network calls followed as they finish, not as they are queued.

JAX queues a jitted call and returns at once, so a sampler's loop queues call after call, and the wait for the
results comes when they are read (in NumPy). Python runs no signal handler during such a wait: Ctrl-C or SIGTERM
would act only once every queued call had finished, and a progress bar advanced at queueing would stand at its
end meanwhile. :class:`Calls` waits for each call while the next one is queued (the device never idles for it),
in short sleeps that a signal interrupts, and counts a call as done when its result is ready. (XLA runs a program
it deems cheap inside the call itself, before returning; a network call over a batch is not one of those.)
"""

from __future__ import annotations

import time
from typing import Callable

import jax

LONGEST_NAP = 0.002  # seconds between two looks at a result still being computed (the device may idle as long)


def wait_ready(tree) -> None:
    """Wait until every JAX array of ``tree`` is computed, in naps of up to :data:`LONGEST_NAP` (a signal's
    handler runs within one nap; NumPy's own wait would hold it until the computation ends)."""
    for a in jax.tree_util.tree_leaves(tree):
        nap = 0.0002
        while not getattr(a, "is_ready", lambda: True)():
            time.sleep(nap)
            nap = min(2 * nap, LONGEST_NAP)


class Calls:
    """The network calls of a sampling loop: call it with each call's output as the call is queued; it waits for
    the call queued before that one, then tells ``progress(1)``. :meth:`finish` waits for the last one."""

    def __init__(self, progress: Callable[[int], None] | None = None):
        self.progress = progress or (lambda k: None)
        self.pending = None

    def __call__(self, out) -> None:
        self.finish()
        self.pending = (out,)

    def finish(self) -> None:
        """Wait for the last call queued (before its results are read)."""
        if self.pending is not None:
            wait_ready(self.pending)
            self.pending = None
            self.progress(1)
