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

Deployed sites never receive these blocks. The ClientApp mod
:func:`simulated_faults_mod` (installed by ``client/app.py``) plays them around the site's
own code, the way Flower's mods wrap a ClientApp (``flwr.clientapp.mod``): the training
code never knows it is in a simulation.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedgen.client.reply import site_reply
from fedgen.client.site import site_id
from fedgen.client.task import round_seed
from fedgen.contract.scenario import FaultsConfig
from fedgen.contract.task import ReplyStatus, SimulatedSite, TaskConfig

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


# -- the ClientApp mod ----------------------------------------------------------------------

def simulated_faults_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower ClientApp mod: a simulated site's planned faults and attack around its train
    reply. Evaluate messages, deployed nodes and tasks without a simulation plan pass through.

    dropout: answered here, the app never runs; crash: raised after the app returns (it
    trained and recorded its spend); straggler: the reply waits ``delay_s`` (and says so in
    its ``delay-s`` metric); Byzantine: the reply's update is replaced by the attack's."""
    simulated = _simulated_site(msg, context)
    if simulated is None:
        return call_next(msg, context)
    site = site_id(context)
    server_round = int(msg.content["config"]["server-round"])
    faults = plan_faults(simulated.faults, site, server_round) if simulated.faults else RoundFaults()
    if faults.dropout:
        return site_reply(msg, site, {"num-examples": 0, "status": int(ReplyStatus.UNAVAILABLE)},
                          message="dropped out (simulated fault)")
    reply = call_next(msg, context)
    if faults.crash:
        raise SimulatedCrash(f"site {site} crashed after training (simulated fault)")
    if not reply.has_error():
        _maybe_attack(simulated, msg, reply, site, server_round)
        if simulated.faults and "metrics" in reply.content.metric_records:
            reply.content["metrics"]["delay-s"] = faults.delay_s
    time.sleep(faults.delay_s)
    return reply


def _simulated_site(msg: Message, context: Context) -> SimulatedSite | None:
    """The harness's plan for a train message to a simulated node (no ``data-path``)."""
    if msg.metadata.message_type != MessageType.TRAIN or "data-path" in context.node_config:
        return None
    return TaskConfig.from_json(str(msg.content["config"]["fedgen"])).simulation


def _maybe_attack(simulated: SimulatedSite, msg: Message, reply: Message, site: str, server_round: int) -> None:
    """A site the scenario made Byzantine replaces its update (in ``reply``, in place)."""
    attack = simulated.byzantine
    if attack is None or site not in attack.sites(simulated.num_sites) or "arrays" not in reply.content:
        return
    state = attack_update(attack.attack, reply.content["arrays"].to_torch_state_dict(),
                          msg.content["arrays"].to_torch_state_dict(), attack.scale,
                          round_seed(attack.seed, site, server_round))
    reply.content["arrays"] = ArrayRecord(state)
