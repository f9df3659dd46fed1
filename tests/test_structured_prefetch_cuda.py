"""Issue 18 on a GPU (skips without CUDA): with prefetched grammar masks, steps with
constrained rows keep replaying the CUDA graphs, and greedy float32 outputs equal the
eager (no graph) path's and the old launch-thread path's.

    AIOSCHED_TEST_DEVICE=cuda .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_structured_prefetch_cuda.py
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tests.test_structured_prefetch import _run, tiny  # noqa: E402,F401  (the fixture)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_cuda_constrained_outputs_equal_eager_and_old_path(make_engine, tiny, async_scheduling: bool) -> None:  # noqa: F811
    graphs = _run(make_engine, tiny, True, async_scheduling, device="cuda")
    eager = _run(make_engine, tiny, True, async_scheduling, device="cuda", enforce_eager=True)
    old = _run(make_engine, tiny, False, async_scheduling, device="cuda")
    assert graphs[1] == eager[1] and graphs[0] == eager[0]
    assert graphs[1] == old[1] and graphs[0] == old[0]
    assert graphs[2]["prefetched_rows"] > graphs[2]["launch_thread_rows"] > 0
    assert graphs[2]["graph_steps"] > 0 and eager[2]["graph_steps"] == 0
