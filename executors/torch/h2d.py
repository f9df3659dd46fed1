"""Small host lists onto the device without making the launch thread wait.

`torch.tensor(values).to("cuda", non_blocking=True)` from ordinary (pageable) host memory
is not a queued copy: the driver first stages the bytes through a pinned buffer of its
own and may synchronize with the stream to do so, so a launch thread that builds a
step's index tensors this way while the previous step runs can wait for that step
(`benchmarks/spec_step_profile.py --h2d-probe` measures it). From pinned memory the copy
is queued and the host goes on; torch's caching host allocator keeps the pinned buffer
until the copy has run. On the CPU the tensor is used as it is.
"""
from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
