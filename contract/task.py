"""The task a site receives each round and the reply it returns (docs/architecture.md §1).

The server builds a :class:`TaskConfig` from the typed scenario (:func:`task_from_scenario`)
and sends it as JSON in the train message's ``config["fedgen"]``; the site decodes it with
:meth:`TaskConfig.from_json`. Its reply carries a :class:`ReplyStatus` and metrics named
in :data:`TRAIN_METRICS` / :data:`EVALUATE_METRICS`; anything else is rejected by the
server's reply check (``server/updates.py``). What the site finally trains under is the
task *after* its own policy (``client/policy.py``): the task is a request.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from fedgen.privacy.dp_fedsgd import plan_dp_fedsgd
from fedgen.privacy.site_level import SiteLevelDP
from fedgen.privacy.skellam import DistributedRelease, plan_distributed_release
from fedgen.shared_models import GenerativeModel, build_model

from .rundir import DataSpec
from .scenario import ByzantineConfig, FaultsConfig, ModelConfig, Scenario, WarmStartConfig


class ReplyStatus(IntEnum):
    """What a site's train reply says it did (metric ``status``)."""

    TRAINED = 0  # the reply carries an update
    BUDGET_EXHAUSTED = 1  # one more step would exceed the site's target epsilon
    UNAVAILABLE = 2  # the site could not take part this round
    POLICY_REFUSED = 3  # the task asked for less privacy than the site's policy allows


#: The metrics a train reply may carry, and an evaluate reply's.
TRAIN_METRICS = ("num-examples", "status", "train-loss", "dp-steps", "epsilon", "delay-s")
EVALUATE_METRICS = ("num-examples", "eval-loss")
METRIC_KEYS = frozenset(TRAIN_METRICS + EVALUATE_METRICS)


@dataclass(frozen=True)
class TrainingConfig:
    """Local optimisation settings sent by the server each round."""

    local_steps: int  # training iterations per round
    batch_size: int  # expected batch size (Poisson: q = batch_size / N)
    lr: float
    proximal_mu: float = 0.0  # FedProx (Li et al. 2020, eq. 2); 0 = plain local SGD


@dataclass(frozen=True)
class PrivacyConfig:
    """Example-level DP settings of the run (keyword-only use everywhere)."""

    enabled: bool
    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"  # "auto" = the family's fastest correct mode
    planned_rounds: int = 1  # rounds the site expects to take part in (for calibration)
    # Simulation-only opt-in: DP noise and sampling from the round's seed (reproducible,
    # and no guarantee against whoever knows the seed). Off: OS entropy every round.
    seeded_noise: bool = False
    # A white-box audit run (privacy.white_box): the site that adds gradient canaries, and how many.
    white_box_canaries: int = 0
    white_box_site: str = ""


@dataclass(frozen=True)
class SimulatedSite:
    """Simulation only: how the harness makes sites misbehave (never sent to deployed sites)."""

    faults: FaultsConfig | None = None
    byzantine: ByzantineConfig | None = None
    num_sites: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"faults": None if self.faults is None else self.faults.model_dump(mode="json"),
                "byzantine": None if self.byzantine is None else self.byzantine.model_dump(mode="json"),
                "num_sites": self.num_sites}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SimulatedSite":
        return cls(faults=None if d.get("faults") is None else FaultsConfig.model_validate(d["faults"]),
                   byzantine=None if d.get("byzantine") is None else ByzantineConfig.model_validate(d["byzantine"]),
                   num_sites=int(d.get("num_sites", 0)))


@dataclass(frozen=True)
class TaskConfig:
    """The server's instructions for one round: which model, how to train it, under which DP."""

    model: ModelConfig
    data_shape: tuple[int, ...]
    num_classes: int | None
    training: TrainingConfig
    privacy: PrivacyConfig
    seed: int
    device: str = "auto"
    simulation: SimulatedSite | None = None
    #: a release warm start (``warm_start`` with ``release``), the model wraps the family in it
    warm_start: WarmStartConfig | None = None

    def build_model(self) -> GenerativeModel:
        return _with_warm_start(build_model(self.model.family, data_shape=self.data_shape,
                                            num_classes=self.num_classes, **self.model.options),
                                self.warm_start, seed=self.seed, target_epsilon=self.privacy.target_epsilon)

    # -- the wire format: JSON in the train message's config["fedgen"] ---------------------
    def to_json(self) -> str:
        d = {"model": {"family": self.model.family, **self.model.options}, "data_shape": list(self.data_shape),
             "num_classes": self.num_classes, "training": asdict(self.training), "privacy": asdict(self.privacy),
             "seed": self.seed, "device": self.device}
        d["training"].pop("proximal_mu")  # FedProx's mu travels as the strategy's own config key
        if self.simulation is not None:
            d["simulation"] = self.simulation.to_dict()
        if self.warm_start is not None:
            d["warm_start"] = self.warm_start.model_dump(mode="json")
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str, proximal_mu: float = 0.0) -> "TaskConfig":
        return cls.from_dict(json.loads(text), proximal_mu)

    @classmethod
    def from_dict(cls, d: dict[str, Any], proximal_mu: float = 0.0) -> "TaskConfig":
        p = d["privacy"]
        return cls(
            model=ModelConfig.model_validate(d["model"]), data_shape=tuple(d["data_shape"]),
            num_classes=d["num_classes"], training=TrainingConfig(**d["training"], proximal_mu=proximal_mu),
            privacy=PrivacyConfig(enabled=p["enabled"], target_epsilon=p["target_epsilon"], delta=p["delta"],
                                  max_grad_norm=p["max_grad_norm"], accountant=p["accountant"],
                                  grad_sample_mode=p["grad_sample_mode"], planned_rounds=p["planned_rounds"],
                                  seeded_noise=bool(p.get("seeded_noise", False)),
                                  white_box_canaries=int(p.get("white_box_canaries", 0)),
                                  white_box_site=str(p.get("white_box_site", ""))),
            seed=int(d["seed"]), device=d.get("device", "auto"),
            simulation=SimulatedSite.from_dict(d["simulation"]) if d.get("simulation") else None,
            warm_start=WarmStartConfig.model_validate(d["warm_start"]) if d.get("warm_start") else None)


def example_level(scenario: Scenario) -> bool:
    """Whether sites run DP-SGD (example-level DP): ``unit`` is ``example`` or ``both``."""
    return scenario.privacy.example_level


def site_level(scenario: Scenario) -> bool:
    """Whether the server runs DP-FedAvg (site-level DP): ``unit`` is ``site`` or ``both``."""
    return scenario.privacy.enabled and scenario.privacy.unit != "example"


def task_from_scenario(scenario: Scenario, spec: DataSpec) -> TaskConfig:
    """What the sites receive each round: how to build and train the model. Simulated
    faults and attacks travel only in a simulation (never to deployed sites)."""
    p = scenario.privacy
    simulated = scenario.deployment is None and (scenario.simulation.faults or scenario.simulation.byzantine)
    return TaskConfig(
        model=scenario.model, data_shape=tuple(spec.shape), num_classes=spec.num_classes,
        training=TrainingConfig(local_steps=scenario.training.local_steps, batch_size=scenario.training.batch_size,
                                lr=scenario.training.lr),
        privacy=PrivacyConfig(enabled=example_level(scenario), target_epsilon=p.target_epsilon, delta=p.delta,
                              max_grad_norm=p.max_grad_norm, accountant=p.accountant,
                              grad_sample_mode=p.grad_sample_mode, planned_rounds=scenario.federation.rounds,
                              seeded_noise=p.seeded_noise,
                              white_box_canaries=p.white_box.canaries if p.white_box else 0,
                              white_box_site=str(p.white_box.site) if p.white_box else ""),
        seed=scenario.seed, device=scenario.simulation.device,
        simulation=SimulatedSite(faults=scenario.simulation.faults, byzantine=scenario.simulation.byzantine,
                                 num_sites=spec.num_sites) if simulated else None,
        warm_start=release_warm_start(scenario))


def build_global_model(scenario: Scenario, spec: DataSpec) -> GenerativeModel:
    """The federation's model as round 1 starts it: the scenario's family, seeded init
    (wrapped for a release warm start: :func:`_with_warm_start`)."""
    torch.manual_seed(scenario.seed)
    return _with_warm_start(build_model(scenario.model.family, data_shape=spec.shape, num_classes=spec.num_classes,
                                        **scenario.model.options), release_warm_start(scenario), seed=scenario.seed,
                            target_epsilon=scenario.privacy.target_epsilon)


def release_warm_start(scenario: Scenario) -> WarmStartConfig | None:
    """The scenario's warm start when it is a DP release (the sites must build the same
    wrapped model), else ``None`` (a public warm start is the server's alone)."""
    ws = scenario.warm_start
    return ws if ws is not None and ws.release is not None else None


def _with_warm_start(model: GenerativeModel, ws: WarmStartConfig | None, *, seed: int,
                     target_epsilon: float) -> GenerativeModel:
    """``model`` wrapped in :class:`~fedgen.shared_models.warm_start.ReleaseWarmStart` for a
    release warm start: an mmd release head on the same data, the family inside; the release
    spends ``epsilon_fraction`` of ``target_epsilon``."""
    if ws is None or ws.release is None:
        return model
    from fedgen.shared_models.warm_start import with_release_warm_start

    r = ws.release
    return with_release_warm_start(model, release_epsilon=r.epsilon_fraction * target_epsilon,  # type: ignore[arg-type]
                                   num_features=r.num_features, family_share=r.family_share,
                                   screen_samples=r.screen_samples,
                                   generator_steps=r.generator_steps, samples=r.samples, steps=ws.steps,
                                   batch_size=ws.batch_size, lr=ws.lr, seed=seed, **r.generator)


def site_level_mechanism(scenario: Scenario, num_sites: int) -> SiteLevelDP | None:
    """The server's DP-FedAvg mechanism, sigma calibrated before round 1 (None unless
    ``privacy.unit`` is ``site`` or ``both``)."""
    if not site_level(scenario):
        return None
    cfg = scenario.privacy.site_level
    return SiteLevelDP.calibrated(target_epsilon=cfg.target_epsilon, delta=cfg.delta, clip_norm=cfg.clip_norm,
                                  sample_rate=cfg.sample_rate, num_sites=num_sites,
                                  planned_rounds=scenario.federation.rounds, accountant=scenario.privacy.accountant,
                                  noise_multiplier=cfg.noise_multiplier)


@dataclass(frozen=True)
class DistributedNoise:
    """The public parameters of a run's distributed Skellam noise (privacy/skellam.py),
    planned once before round 1: the ``release`` a release family (mmd) or a release warm
    start makes in round 1, and the ``sgd`` plan of the DP-FedSGD rounds
    (privacy/dp_fedsgd.py) -- after a release warm start planned so that the release and
    every fine-tuning round compose to the target (its ``prior``). A round uses the plan of
    what the global model asks of it (:meth:`for_model`)."""

    release: DistributedRelease | None = None
    sgd: DistributedRelease | None = None

    def for_model(self, model: GenerativeModel) -> DistributedRelease | None:
        """The plan of the round ``model`` starts: its release, or one DP-FedSGD step
        (``None`` for a DP-FedSGD round after a warm start that planned no rounds)."""
        return self.release if model.wants_release() else self.sgd


def distributed_noise_plan(scenario: Scenario, model: GenerativeModel) -> DistributedNoise | None:
    """The run's :class:`DistributedNoise`, from the scenario and the round-1 model: every
    site's epsilon target, the bit width, the threshold and the shape of what a site sums
    -- the release buffer of a release family or warm start (its ``release_epsilon``, for a
    warm start), one private step's gradient for DP-FedSGD. None unless ``noise:
    distributed``; raises :class:`~fedgen.privacy.skellam.BitsTooSmall` when the bit width
    cannot hold the sum."""
    fed, cfg = scenario.federation, scenario.privacy
    sec = fed.secure_aggregation
    if sec is None or sec.noise != "distributed":
        return None
    common = dict(delta=cfg.delta, bits=sec.bits, num_sites=fed.num_sites, threshold=sec.threshold,
                  max_records=sec.max_records)
    release = None
    if model.wants_release():
        shape = tuple(model.state_dict()[model.release_buffer].shape)
        release = plan_distributed_release(epsilon=model.release_epsilon or cfg.target_epsilon,
                                           dim=shape[-1], size=int(np.prod(shape)), **common)
        if model.release_epsilon is None:  # a pure release family: the release is the whole run
            return DistributedNoise(release=release)
    rounds = fed.rounds - int(release is not None)  # a warm start's release takes round 1
    sgd = None if rounds < 1 else plan_dp_fedsgd(model, epsilon=cfg.target_epsilon, rounds=rounds, after=release,
                                                  batch_size=scenario.training.batch_size, **common)
    return DistributedNoise(release=release, sgd=sgd)
