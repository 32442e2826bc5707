"""Faults for simulation studies: Byzantine sites (``simulation.byzantine``) and
unreliable ones (``simulation.faults``: dropouts, crashes, stragglers).

A Byzantine site trains like any other, then replaces its update ``Delta = w_k - w``
before replying:

* ``sign_flip``: ``w - scale * Delta`` (Damaskinos et al. 2018; Fang et al. 2020);
* ``scale``: ``w + scale * Delta`` (a boosted, "model replacement" update, Bagdasaryan
  et al. 2020);
* ``gaussian``: ``w + N(0, scale^2 I)`` (random noise in place of an update).

Which sites attack is fixed for the whole run by the scenario's seed, and recorded in
every round of ``metrics.jsonl``.

Unreliable sites (:func:`plan_faults`), drawn independently per (seed, site, round):

* dropout: the site is unreachable this round -- it answers "dropped out" at once,
  trains nothing and spends no budget;
* crash: the site trains (and records the DP steps it took in its own ledger, which is
  conservative: nothing was released), then dies before replying -- the server sees an
  error reply;
* straggler: the site replies ``delay_s`` late; past ``federation.round_timeout_s`` the
  server aggregates without it.

Deployed sites never receive these blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from fedgen.contract.scenario import FaultsConfig

ATTACKS: dict[str, Callable[[torch.Tensor, torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "sign_flip": lambda w, w0, scale, gen: w0 - scale * (w - w0),
    "scale": lambda w, w0, scale, gen: w0 + scale * (w - w0),
    "gaussian": lambda w, w0, scale, gen: w0 + scale * torch.randn(w.shape, generator=gen, dtype=w.dtype),
}


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


@dataclass(frozen=True)
class RoundFaults:
    """What goes wrong at one site in one round (``simulation.faults``)."""

    dropout: bool = False  # unreachable: replies "dropped out" without training
    crash: bool = False  # trains, then dies before replying (an error reply)
    delay_s: float = 0.0  # a straggler: replies this much later


def plan_faults(cfg: FaultsConfig, site: str, server_round: int) -> RoundFaults:
    """The seeded faults of ``site`` in ``server_round``: the same on every re-run."""
    rng = random.Random(f"faults/{cfg.seed}/{site}/{server_round}")
    dropout, crash, slow = rng.random() < cfg.dropout, rng.random() < cfg.crash, rng.random()
    low, high = cfg.straggler_delay_s
    delay = rng.uniform(low, high) if slow < cfg.straggler else 0.0
    return RoundFaults(dropout=dropout, crash=crash and not dropout, delay_s=0.0 if dropout else delay)


class SimulatedCrash(RuntimeError):
    """A site process dying mid-round (simulation only)."""
