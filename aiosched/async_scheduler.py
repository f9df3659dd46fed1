"""One-step-ahead scheduling: build step N+1 while step N runs.

The only differences from the sync scheduler: tokens not sampled yet count as
*output placeholders* (the worker fills them from its own device-side history),
and a request whose last token is still in flight is not re-admitted.
Everything else (budget, preemption, prefix caching, stop checks) is inherited.
"""
from __future__ import annotations

from aiosched.request import Request
from aiosched.scheduler import Scheduler, lookahead_new_tokens


class AsyncScheduler(Scheduler):
    _num_new_tokens = lookahead_new_tokens  # (inlined in `schedule`)

    def _can_admit(self, req: Request) -> bool:
        # Preempted with a step in flight: wait until that token is known.
        return req.num_output_placeholders == 0
