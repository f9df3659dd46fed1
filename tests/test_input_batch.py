"""InputBatch, the worker's step builder: what a step's staging buffer holds, which steps
count as decode-only, and when the runner may take the plain argmax."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aiosched.protocol import NewRequestData, ScheduledRequest, SchedulerOutput
from aiosched.sampling_params import SamplingParams
from aiosched.executors.torch.input_batch import InputBatch

BLOCK = 4
GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def _batch(prompts: dict[str, int], sampling: dict[str, SamplingParams] | None = None) -> InputBatch:
    ib = InputBatch(max_rows=8, row_len=256, block_size=BLOCK, max_tokens=256, device=torch.device("cpu"))
    for rid, n in prompts.items():
        ib.add(NewRequestData(rid, list(range(1, n + 1)), n, (sampling or {}).get(rid, GREEDY), 0, [0]))
    return ib


def _blocks(n_tokens: int, base: int) -> list[int]:
    return list(range(base, base + -(-n_tokens // BLOCK)))


def test_staging_holds_each_token_row_and_position() -> None:
    """Token i of the step: its request's buffer row and its position; then the per-request
    rows and attention lengths; padding up to the layout's sizes."""
    ib = _batch({"a": 10, "b": 3, "c": 7})
    # a: prefill chunk of 6 from 0; b: whole prompt; c: chunk 4..7 (samples)
    so = SchedulerOutput(1, [], [ScheduledRequest("a", 6, 0, _blocks(6, 0), False),
                                 ScheduledRequest("b", 3, 0, _blocks(3, 10), True),
                                 ScheduledRequest("c", 3, 4, _blocks(7, 20), True)], [], 12)
    step = ib.schedule(so)
    assert not step.decode_only
    assert step.flat_offsets == {"a": 0, "b": 6, "c": 9}
    layout = ib.exact_layout(step, 1, tiles=False)
    dev = ib.upload(step, layout).numpy()
    rows = {rid: ib.reqs[rid].row for rid in "abc"}
    want_rows = [rows["a"]] * 6 + [rows["b"]] * 3 + [rows["c"]] * 3
    want_pos = list(range(0, 6)) + list(range(0, 3)) + list(range(4, 7))
    T = layout.T
    assert dev[:T].tolist() == want_rows
    assert dev[T:2 * T].tolist() == want_pos
    assert dev[layout.o_rows:layout.o_rows + 3].tolist() == [rows["a"], rows["b"], rows["c"]]
    assert dev[layout.o_seq:layout.o_seq + 3].tolist() == [6, 3, 7]
    assert dev[layout.o_cu:layout.o_cu + 4].tolist() == [0, 6, 9, 12]
    assert step.logit_rows == [8, 11] and step.num_logits == [1, 1]


def test_a_decode_step_is_decode_only_and_padded() -> None:
    ib = _batch({"a": 5, "b": 9})
    so = SchedulerOutput(1, [], [ScheduledRequest("a", 1, 4, _blocks(5, 0), True),
                                 ScheduledRequest("b", 1, 8, _blocks(9, 10), True)], [], 2)
    step = ib.schedule(so)
    assert step.decode_only
    layout = ib.padded_layout(4, True, 1)
    dev = ib.upload(step, layout).numpy()
    ra, rb = ib.reqs["a"].row, ib.reqs["b"].row
    assert dev[:4].tolist() == [ra, rb, ib.scratch_row, ib.scratch_row]
    assert dev[4:8].tolist() == [4, 8, -1, -1]  # padding writes no KV
    assert dev[layout.o_seq:layout.o_seq + 4].tolist() == [5, 9, 1, 1]  # padding reads one scratch key
    assert step.dst == [ra * ib.row_len + 5, rb * ib.row_len + 9]
    # a request that computes a token without sampling it (a chunk's end not reached) is not a decode
    so2 = SchedulerOutput(2, [], [ScheduledRequest("a", 1, 5, [], False)], [], 1)
    ib.reqs["a"].num_tokens = 7
    assert not ib.schedule(so2).decode_only


@pytest.mark.parametrize("other", [SamplingParams(max_tokens=8, temperature=0.7),
                                   SamplingParams(max_tokens=8, temperature=0.0, min_tokens=3)])
def test_greedy_is_every_row_plain_argmax(other: SamplingParams) -> None:
    """The plain argmax serves a step only if none of its rows samples or bans EOS now;
    a live request that does is counted from add to free."""
    ib = _batch({"a": 4, "b": 4}, {"b": other})
    a, b = ib.reqs["a"], ib.reqs["b"]
    assert ib.num_not_greedy == 1
    assert ib.greedy([a]) and not ib.greedy([a, b])
    if other.min_tokens:
        b.num_tokens = 4 + other.min_tokens  # its bans are over
        assert ib.greedy([a, b])
    ib.free("b")
    assert ib.num_not_greedy == 0 and ib.greedy([a])
    ib.free("a")
    assert ib.num_not_greedy == 0


def _device_row(ib: InputBatch, rid: str) -> tuple[list[int], int, list[float], list[int]]:
    st = ib.reqs[rid]
    n = st.num_tokens
    return (ib.tokens[st.row, :n].tolist(), int(ib.num_tokens_dev[st.row]), [round(x, 4) for x in ib.row_f[st.row].tolist()],
            ib.row_i[st.row].tolist())


def test_new_requests_reach_the_device_with_the_step_upload() -> None:
    """add() writes nothing on the device (each small copy cost the launch thread ~0.1 ms on a
    GPU host); the step's upload carries every new request's tokens, count and sampling
    parameters in the same copy."""
    hot = SamplingParams(max_tokens=8, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)
    ib = _batch({"a": 5, "b": 3}, {"b": hot})
    a, b = ib.reqs["a"], ib.reqs["b"]
    assert ib.tokens[a.row].abs().sum() == 0 and ib.tokens[b.row].abs().sum() == 0  # nothing written yet
    so = SchedulerOutput(1, [], [ScheduledRequest("a", 5, 0, _blocks(5, 0), True), ScheduledRequest("b", 3, 0, _blocks(3, 10), True)], [], 8)
    step = ib.schedule(so)
    ib.upload(step, ib.exact_layout(step, 1, tiles=False))
    assert _device_row(ib, "a") == ([1, 2, 3, 4, 5], 5, [0.0, 1.0, 0.0], [0, 0])
    assert _device_row(ib, "b") == ([1, 2, 3], 3, [0.7, 0.9, 0.05], [5, 0])


def test_a_row_freed_before_the_upload_takes_only_its_next_request() -> None:
    ib = _batch({"a": 4})
    row = ib.reqs["a"].row
    ib.free("a")
    ib.add(NewRequestData("c", [7, 8], 2, GREEDY, 3, [0]))
    assert ib.reqs["c"].row == row  # the same row, reused in the same step
    so = SchedulerOutput(1, [], [ScheduledRequest("c", 2, 0, _blocks(2, 0), True)], [], 2)
    step = ib.schedule(so)
    ib.upload(step, ib.exact_layout(step, 1, tiles=False))
    assert _device_row(ib, "c") == ([7, 8], 2, [0.0, 1.0, 0.0], [0, 3])
    assert ib.tokens[row, 2:4].tolist() == [0, 0]  # a's tokens 3 and 4 were never written


def test_a_history_longer_than_the_staging_room_is_written_in_its_own_copies() -> None:
    ib = InputBatch(max_rows=2, row_len=8192, block_size=BLOCK, max_tokens=16, device=torch.device("cpu"))
    n = ib.stage.capacity  # more tokens than the whole staging buffer holds
    ib.add(NewRequestData("long", [(i % 500) + 1 for i in range(n)], 10, GREEDY, 1, [0]))
    ib.add(NewRequestData("short", [9, 9], 2, GREEDY, 2, [0]))
    so = SchedulerOutput(1, [], [ScheduledRequest("short", 2, 0, _blocks(2, 0), True)], [], 2)
    step = ib.schedule(so)
    ib.upload(step, ib.exact_layout(step, 1, tiles=False))
    toks, count, _, ints = _device_row(ib, "long")
    assert toks == [(i % 500) + 1 for i in range(n)] and count == n and ints == [0, 1]
    assert _device_row(ib, "short")[:2] == ([9, 9], 2)
    assert not ib._new
