"""The obviously correct fp32 loop. Tests hold every fast op equal to it."""

from __future__ import annotations

import torch


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
    rank: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """Add the per-token low-rank term into ``y`` in place.

    Shapes: ``y [T, d_out]``, ``x [T, d_in]``, ``a [S, R, d_in]``,
    ``bt [S, R, d_out]`` (B transposed), ``scale [S]``, ``rank [S]``,
    ``token_slots [T]`` (``-1`` means base model only).

    Semantics::

        for t in range(T):
            s = token_slots[t]
            if s < 0 or rank[s] == 0: continue      # exactly zero contribution
            r = rank[s]
            y[t] += scale[s] * (x[t] @ a[s, :r].T) @ bt[s, :r]

    Computed in fp32 whatever the input dtype, then cast back into ``y``.
    """
    slots = token_slots.tolist()
    ranks = rank.tolist()
    scales = scale.tolist()
    for t, s in enumerate(slots):
        if s < 0 or ranks[s] == 0:
            continue
        r = ranks[s]
        h = x[t].float() @ a[s, :r].float().T
        delta = scales[s] * (h @ bt[s, :r].float())
        y[t] = (y[t].float() + delta).to(y.dtype)
