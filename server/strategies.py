"""Strategy registry over Flower's Message-API strategies (``flwr.serverapp.strategy``).

Averaging: ``fedavg``, ``fedprox``, ``fedadam``. Robust to a minority of bad sites:
``fedmedian`` (coordinate-wise median, Yin et al. 2018), ``fedtrimmedavg`` (coordinate-wise
trimmed mean, Yin et al. 2018), ``krum`` and ``multikrum`` (Blanchard et al. 2017).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy

from fedgen.contract.scenario import FederationConfig

_STRATEGIES: dict[str, Callable[..., Strategy]] = {}
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")


def register_strategy(name: str) -> Callable[[Callable[..., Strategy]], Callable[..., Strategy]]:
    def decorator(fn: Callable[..., Strategy]) -> Callable[..., Strategy]:
        _STRATEGIES[name] = fn
        return fn
    return decorator


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def _sampling(fed: FederationConfig) -> dict[str, Any]:
    # Evaluation is done by the server on the reference split (simulation) or by the
    # evaluate round (deployment); the strategy's own sampling only drives training.
    return dict(fraction_train=fed.fraction_fit, fraction_evaluate=0.0,
                min_train_nodes=fed.min_fit_sites, min_evaluate_nodes=0,
                min_available_nodes=fed.min_fit_sites)


@register_strategy("fedavg")
def _fedavg(fed: FederationConfig) -> Strategy:
    """FedAvg, weighted by examples (McMahan et al. 2017)."""
    return FedAvg(**_sampling(fed))


@register_strategy("fedprox")
def _fedprox(fed: FederationConfig) -> Strategy:
    """FedProx (Li et al. 2020): FedAvg on the server, proximal term at the sites."""
    return FedProx(proximal_mu=fed.proximal_mu, **_sampling(fed))


@register_strategy("fedadam")
def _fedadam(fed: FederationConfig) -> Strategy:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization")."""
    return FedAdam(eta=fed.server_lr, **_sampling(fed))


@register_strategy("fedmedian")
def _fedmedian(fed: FederationConfig) -> Strategy:
    """Coordinate-wise median of the updates (Yin et al. 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates")."""
    return FedMedian(**_sampling(fed))


@register_strategy("fedtrimmedavg")
def _fedtrimmedavg(fed: FederationConfig) -> Strategy:
    """Coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest
    values on each side (Yin et al. 2018)."""
    return FedTrimmedAvg(beta=fed.trim_fraction, **_sampling(fed))


@register_strategy("krum")
def _krum(fed: FederationConfig) -> Strategy:
    """Krum (Blanchard et al. 2017): the one update closest to its n - f - 2 nearest others."""
    return Krum(num_malicious_nodes=fed.byzantine_sites, **_sampling(fed))


@register_strategy("multikrum")
def _multikrum(fed: FederationConfig) -> Strategy:
    """Multi-Krum (Blanchard et al. 2017): the mean of the ``krum_select`` best-scored updates."""
    return MultiKrum(num_malicious_nodes=fed.byzantine_sites, num_nodes_to_select=fed.krum_select,
                     **_sampling(fed))


def build_strategy(name: str, federation: FederationConfig) -> Strategy:
    try:
        factory = _STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(list_strategies())}") from None
    return factory(federation)


#: A strategy's state across rounds: FedOpt's (FedAdam's) first and second moments. The
#: other registered strategies hold none (their round state is rebuilt by configure_train).
_STATEFUL_ATTRIBUTES = ("m_t", "v_t")


def _state_holder(strategy: Strategy) -> Strategy:
    """The strategy whose attributes hold the round state: a wrapper's inner one
    (``server/site_level.py``'s DP-FedAvg keeps its state in the ledger, not here)."""
    return getattr(strategy, "inner", strategy)


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """The arrays a checkpoint keeps of ``strategy`` (attribute -> parameter -> tensor);
    tensors only, so the checkpoint loads with ``weights_only=True``."""
    holder = _state_holder(strategy)
    return {attr: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
            for attr in _STATEFUL_ATTRIBUTES if (arrays := getattr(holder, attr, None))}


def load_strategy_state(strategy: Strategy, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Restore :func:`strategy_state` into a strategy rebuilt from the scenario."""
    strategy = _state_holder(strategy)
    unknown = set(state) - set(_STATEFUL_ATTRIBUTES)
    if unknown or any(not hasattr(strategy, attr) for attr in state):
        raise ValueError(f"strategy state {sorted(state)} does not fit {type(strategy).__name__}")
    for attr, arrays in state.items():
        setattr(strategy, attr, {k: v.numpy() for k, v in arrays.items()})
