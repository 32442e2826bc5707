"""Byzantine sites for simulation studies (``simulation.byzantine`` in a scenario).

A Byzantine site trains like any other, then replaces its update ``Delta = w_k - w``
before replying:

* ``sign_flip``: ``w - scale * Delta`` (Damaskinos et al. 2018; Fang et al. 2020);
* ``scale``: ``w + scale * Delta`` (a boosted, "model replacement" update, Bagdasaryan
  et al. 2020);
* ``gaussian``: ``w + N(0, scale^2 I)`` (random noise in place of an update).

Which sites attack is fixed for the whole run by the scenario's seed, and recorded in
every round of ``metrics.jsonl``. Deployed sites never receive this block.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

ATTACKS: dict[str, Callable[[torch.Tensor, torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "sign_flip": lambda w, w0, scale, gen: w0 - scale * (w - w0),
    "scale": lambda w, w0, scale, gen: w0 + scale * (w - w0),
    "gaussian": lambda w, w0, scale, gen: w0 + scale * torch.randn(w.shape, generator=gen, dtype=w.dtype),
}


def byzantine_sites(num_sites: int, fraction: float, seed: int) -> list[str]:
    """The ids of the ``round(fraction * num_sites)`` attacking sites (seeded)."""
    count = round(fraction * num_sites)
    return [str(s) for s in sorted(random.Random(f"byzantine/{seed}").sample(range(num_sites), count))]


def attack_update(attack: str, state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor],
                  scale: float, seed: int) -> dict[str, torch.Tensor]:
    """``state`` with every floating-point tensor's update replaced by the ``attack``'s."""
    try:
        fn = ATTACKS[attack]
    except KeyError:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(sorted(ATTACKS))}") from None
    gen = torch.Generator().manual_seed(seed)
    return {k: fn(w, global_state[k].to(w.dtype), scale, gen) if w.is_floating_point() else w
            for k, w in state.items()}
