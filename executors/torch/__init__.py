"""The torch worker: model runner, CUDA step path and graphs, kernels, layers, models, sampling, speculative decoding."""
import os as _os

# torch's CPU threads are OpenMP threads, which by default spin after each parallel region.
# With as many torch threads as cores, the spinning threads starve the event loop and the
# executor's launch/result threads (issue 23: 2 threads on 2 cores ran 6x slower than 1);
# sleeping waiters give the cores back. libgomp reads this once, when torch loads, so it is
# set here, before any module of this package imports torch; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
