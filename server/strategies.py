"""Strategy registry over Flower's Message-API strategies (``flwr.serverapp.strategy``)."""

from __future__ import annotations

from typing import Any, Callable

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

_STRATEGIES: dict[str, Callable[..., Strategy]] = {}


def register_strategy(name: str) -> Callable[[Callable[..., Strategy]], Callable[..., Strategy]]:
    def decorator(fn: Callable[..., Strategy]) -> Callable[..., Strategy]:
        _STRATEGIES[name] = fn
        return fn
    return decorator


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def _sampling(fed: dict[str, Any]) -> dict[str, Any]:
    # Evaluation is done by the server on the reference split (simulation) or by the
    # evaluate round (deployment); the strategy's own sampling only drives training.
    return dict(fraction_train=fed["fraction_fit"], fraction_evaluate=0.0,
                min_train_nodes=fed["min_fit_sites"], min_evaluate_nodes=0,
                min_available_nodes=fed["min_fit_sites"])


@register_strategy("fedavg")
def _fedavg(fed: dict[str, Any]) -> Strategy:
    """FedAvg, weighted by examples (McMahan et al. 2017)."""
    return FedAvg(**_sampling(fed))


@register_strategy("fedprox")
def _fedprox(fed: dict[str, Any]) -> Strategy:
    """FedProx (Li et al. 2020): FedAvg on the server, proximal term at the sites."""
    return FedProx(proximal_mu=fed["proximal_mu"], **_sampling(fed))


@register_strategy("fedadam")
def _fedadam(fed: dict[str, Any]) -> Strategy:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization")."""
    return FedAdam(eta=fed["server_lr"], **_sampling(fed))


def build_strategy(name: str, federation: dict[str, Any]) -> Strategy:
    try:
        factory = _STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(list_strategies())}") from None
    return factory(federation)
