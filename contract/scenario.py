"""The scenario schema: everything a simulation run needs, validated with pydantic.

Unknown keys and wrong types are rejected with the key path (``federation.rounds: ...``).
``resolve_scenario`` fills every default so the run directory's ``scenario.yaml`` says
exactly what ran.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from fedgen.shared_models import DPSGDTrainable, list_models, model_options
from fedgen.shared_models.perceptual import perceptual_dim
from fedgen.shared_models.registry import get_model_builder

from .data_formats import DATA_FORMATS, TableSchema, data_format
from .errors import ScenarioError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """The dataset: any format of the reader registry (contract/data_formats.py) with that
    reader's ``options``, the same options a deployed site gives in ``--node-config``."""

    format: str = Field("digits", description=f"one of: {', '.join(DATA_FORMATS)}")
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="the format's reader options "
                                    "(docs/simulation.md, Your own data)")
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    conditional: bool = True  # use labels (class-conditional model) when the data has them

    @field_validator("format")
    @classmethod
    def _registered(cls, value: str) -> str:
        return data_format(value).name

    @field_validator("options")
    @classmethod
    def _accepted_by_format(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "format" not in info.data:  # the format's own error is reported instead
            return value
        return data_format(info.data["format"]).parse(value).model_dump(mode="json")

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if data_format(self.format).needs_path and not self.path:
            raise ValueError(f"data.path is required for format {self.format!r}")
        return self


class RotationSkew(_Section):
    """Feature skew: each site's images rotated by its own angle, the angles evenly spread
    over [-max_degrees, max_degrees] (client/feature_skew.py)."""

    kind: Literal["rotation"]
    max_degrees: float = Field(30.0, gt=0.0, le=180.0, description="largest rotation either way, in degrees")
    parameter: ClassVar[str] = "degrees"

    def bounds(self) -> tuple[float, float]:
        return -self.max_degrees, self.max_degrees


class ContrastSkew(_Section):
    """Feature skew: each site's images with their contrast scaled by its own factor, the
    factors evenly spread over [min, max] (client/feature_skew.py)."""

    kind: Literal["contrast"]
    min: float = Field(0.5, gt=0.0, description="smallest contrast factor (1 = unchanged)")
    max: float = Field(1.5, gt=0.0, description="largest contrast factor")
    parameter: ClassVar[str] = "factor"

    @model_validator(mode="after")
    def _ordered(self) -> "ContrastSkew":
        if self.min > self.max:
            raise ValueError(f"min must be <= max, got min {self.min} > max {self.max}")
        return self

    def bounds(self) -> tuple[float, float]:
        return self.min, self.max


def _skew_kind(value: Any) -> str | None:
    return value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)


FeatureSkew = Annotated[
    Union[Annotated[RotationSkew, Tag("rotation")], Annotated[ContrastSkew, Tag("contrast")]],
    Discriminator(_skew_kind, custom_error_type="feature_skew_kind",
                  custom_error_message="needs kind: rotation or kind: contrast")]


class PartitionConfig(_Section):
    name: Literal["iid", "dirichlet", "shards", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration: label skew (dirichlet) or site "
                         "sizes (quantity); smaller = more skewed")
    shards_per_site: int = Field(2, ge=1)
    min_examples: int = Field(1, ge=1)
    feature_skew: FeatureSkew | None = Field(None, description="per-site image transform (simulation): "
                                             "{kind: rotation, max_degrees} or {kind: contrast, min, max}")


class SecureAggregationConfig(_Section):
    """SecAgg+ (Bell et al. 2020) over the Message API (server/secagg.py, client/secagg.py):
    the server learns only the sum of the sites' clipped, quantised updates."""

    threshold: int = Field(..., ge=2, description="t: sites needed to unmask a round; tolerates n - t dropouts, "
                           "protects against up to t - 1 colluding parties")
    bits: int = Field(32, ge=8, le=62, description="integers modulo 2^bits (the sum of n sites stays below it)")
    clip_norm: float = Field(100.0, gt=0.0, description="L2 bound on each site's update w_k - w before quantising")
    neighbours: int | None = Field(None, ge=2, description="SecAgg+: share keys with this many ring neighbours "
                                   "(null = with every sampled site, as SecAgg)")
    noise: Literal["local", "distributed"] = Field(
        "local", description="local: each site adds its full DP noise; distributed: a release (mmd), or one "
        "DP-FedSGD step a round (vae, flow, diffusion; training.local_steps: 1), is rounded to integers and each "
        "site adds only its Skellam share, the sum carrying the central noise (privacy/skellam.py, "
        "privacy/dp_fedsgd.py)")
    max_records: int = Field(100_000, ge=1, description="noise: distributed: a public bound on one site's "
                             "records, bounding the sum against wrap-around (a site holding more refuses); "
                             "DP-FedSGD samples at q = training.batch_size / max_records")


class FederationConfig(_Section):
    num_sites: int = Field(5, ge=1)
    rounds: int = Field(5, ge=1)
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    min_fit_sites: int = Field(1, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx mu")
    server_lr: float = Field(0.01, gt=0.0, description="FedAdam eta")
    trim_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="fedtrimmedavg: share cut on each side")
    byzantine_sites: int = Field(0, ge=0, description="krum / multikrum: number f of Byzantine sites assumed")
    krum_select: int = Field(2, ge=1, description="multikrum: updates averaged")
    norm_bound: float | None = Field(None, gt=0.0, description="scale updates farther than this from the "
                                     "global model back to it before aggregating; null = off")
    outlier_factor: float | None = Field(10.0, gt=1.0, description="reject an update whose norm exceeds this "
                                         "multiple of the round's median; null = off")
    round_timeout_s: float = Field(3600.0, gt=0.0, description="round deadline: the server aggregates the "
                                   "replies that arrived by then and counts the rest as late")
    secure_aggregation: SecureAggregationConfig | None = Field(
        None, description="{threshold, bits, clip_norm, neighbours}: the server sees only the sum (default: off)")

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> "FederationConfig":
        sec = self.secure_aggregation
        if sec is None:
            return self
        if sec.threshold > self.num_sites:
            raise ValueError(f"secure_aggregation.threshold: {sec.threshold} is more than the {self.num_sites} "
                             "sites; set it between 2 and federation.num_sites")
        if ((1 << sec.bits) - 1) // self.num_sites < 256:
            raise ValueError(f"secure_aggregation.bits: {sec.bits} bits leave fewer than 256 quantisation levels "
                             f"per site for {self.num_sites} sites; raise bits (e.g. 32)")
        if sec.neighbours is not None and sec.threshold > min(sec.neighbours + 1, self.num_sites):
            raise ValueError(f"secure_aggregation.threshold: {sec.threshold} is more than a site's neighbourhood "
                             f"({sec.neighbours} neighbours + itself); lower threshold or raise neighbours")
        if self.strategy != "fedavg":
            raise ValueError(f"secure_aggregation: the {self.strategy} rule needs each site's update, which "
                             "secure aggregation hides; set strategy: fedavg or remove secure_aggregation")
        if self.norm_bound is not None:
            raise ValueError("secure_aggregation: norm_bound needs each site's update; remove norm_bound "
                             "(secure_aggregation.clip_norm bounds every update at the site)")
        return self


def has_perceptual_features(options: dict[str, Any]) -> bool:
    """Whether mmd options (a model's, or a release warm start's generator's) ask for
    perceptual features (``perceptual_weight > 0``), whose network a public set trains."""
    return float(options.get("perceptual_weight") or 0.0) > 0.0


class ModelConfig(BaseModel):
    """``family`` plus that family's own options (checked against its builder)."""

    model_config = ConfigDict(extra="allow")
    family: str = "vae"

    @model_validator(mode="after")
    def _known_family_and_options(self) -> "ModelConfig":
        if self.family not in list_models():
            raise ValueError(f"unknown model family {self.family!r}; registered: {', '.join(list_models())}")
        share = (self.model_extra or {}).get("base_release_epsilon", "absent")
        if share != "absent":  # issue 18: the flow's own release became the one every DP-SGD family shares
            fix = f"warm_start: {{release: {{epsilon_fraction: F}}}} with F = {share:g} / privacy.target_epsilon" \
                if isinstance(share, (int, float)) \
                else "nothing (the flow trains by DP-SGD alone)"
            raise ValueError(f"base_release_epsilon: the flow's release became the warm start every DP-SGD family "
                             f"shares; remove the key and write {fix} (docs/models.md, \"Warm starts\")")
        allowed = set(model_options(self.family))
        unknown = sorted(set(self.model_extra or {}) - allowed)
        if unknown:
            raise ValueError(f"option(s) {', '.join(unknown)} not accepted by family {self.family!r}; "
                             f"accepted: {', '.join(sorted(allowed))}")
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def perceptual(self) -> bool:
        """Whether the model has perceptual features (``perceptual_weight > 0``)."""
        return has_perceptual_features(self.options)


class TrainingConfigSection(_Section):
    local_steps: int = Field(20, ge=1, description="training iterations per round")
    batch_size: int = Field(64, ge=1, description="expected batch size (Poisson under DP)")
    lr: float = Field(1e-3, gt=0.0)


class CanaryConfig(_Section):
    """Canaries for the one-run privacy audit (Steinke, Nasr & Jagielski 2023): ``count``
    random-pattern records, each added to site ``site``'s training data with probability
    1/2 drawn from ``seed``; ``fedgen audit RUN_DIR`` scores them (docs/audit.md)."""

    count: int = Field(..., ge=2, description="number of canaries m (each included with prob. 1/2)")
    site: int = Field(0, ge=0, description="the site whose training data receives the canaries")
    seed: int = Field(0, description="seed of the canaries' pixels, labels and inclusion bits")


class WhiteBoxConfig(_Section):
    """A white-box audit run (privacy/audit/dirac.py, docs/audit.md): site ``site`` adds
    ``canaries`` Dirac gradient canaries to its DP-SGD steps and keeps every update it sends;
    ``fedgen audit RUN_DIR`` turns them into an empirical eps lower bound."""

    canaries: int = Field(..., ge=2, description="number of gradient canaries m (at most the model's parameters)")
    site: int = Field(0, ge=0, description="the site that runs the white-box audit")


class SiteLevelConfig(_Section):
    """DP-FedAvg on the server (McMahan et al. 2018), used when ``privacy.unit`` is
    ``site`` or ``both``: each site's update is clipped to ``clip_norm``, sites are
    Poisson-sampled with ``sample_rate`` each round, and Gaussian noise calibrated to
    ``target_epsilon`` over the planned rounds is added to the sum (privacy/site_level.py)."""

    target_epsilon: float = Field(10.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    clip_norm: float = Field(1.0, gt=0.0, description="L2 bound C on each site's update w_k - w")
    sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="probability q that a site takes part in a round")
    noise_multiplier: float | None = Field(None, gt=0.0, description="sigma; null = calibrate to target_epsilon")


class PrivacySection(_Section):
    enabled: bool = True
    unit: Literal["example", "site", "both"] = Field(
        "example", description="what DP protects: one record (DP-SGD at the sites), one site (DP-FedAvg on "
        "the server), or both")
    target_epsilon: float = Field(10.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["auto", "ghost", "hooks", "functorch", "bk"] = "auto"
    seeded_noise: bool = Field(
        False, description="simulation only: draw the sites' DP noise and Poisson sampling from the scenario "
        "seed, so a run is reproducible -- and NOT a privacy guarantee to anyone who knows the seed (the run "
        "says so); default: fresh OS entropy every round. Deployed sites refuse it")
    canaries: CanaryConfig | None = Field(None, description="plant audit canaries (default: none)")
    white_box: WhiteBoxConfig | None = Field(None, description="a white-box audit run with gradient canaries "
                                             "at one site (default: none); needs example-level DP")
    site_level: SiteLevelConfig = SiteLevelConfig()

    @property
    def example_level(self) -> bool:
        """Whether sites run DP-SGD (example-level DP): ``unit`` is ``example`` or ``both``."""
        return self.enabled and self.unit != "site"


class EvaluationConfig(_Section):
    every: int = Field(1, ge=0, description="evaluate every N rounds (0 = only at the end)")
    num_samples: int = Field(500, ge=1)
    tstr: bool = Field(False, description="train-synthetic-test-real accuracy after the last round")
    federated: bool = Field(False, description="without a reference set, ask every site each evaluated round for "
                            "the global model's loss on its data (a scalar outside the DP guarantee)")


class ByzantineConfig(_Section):
    """Sites that send corrupted updates (simulation only; simulations/faults.py)."""

    fraction: float = Field(..., gt=0.0, lt=1.0, description="share of the sites that attack")
    attack: Literal["sign_flip", "scale", "gaussian"] = "sign_flip"
    scale: float = Field(10.0, gt=0.0, description="factor (sign_flip, scale) or noise std (gaussian)")
    seed: int = Field(0, description="which sites attack")

    def sites(self, num_sites: int) -> list[str]:
        """The ids of the attacking sites, fixed for the whole run by ``seed``."""
        return byzantine_sites(num_sites, self.fraction, self.seed)


def byzantine_sites(num_sites: int, fraction: float, seed: int) -> list[str]:
    """The ids of the ``round(fraction * num_sites)`` attacking sites (seeded)."""
    count = round(fraction * num_sites)
    return [str(s) for s in sorted(random.Random(f"byzantine/{seed}").sample(range(num_sites), count))]


class FaultsConfig(_Section):
    """Unreliable sites (simulation only; simulations/faults.py), drawn per (seed, site, round)
    and recorded in every round's ``faults`` entry of ``metrics.jsonl``."""

    dropout: float = Field(0.0, ge=0.0, le=1.0, description="probability a sampled site is unreachable")
    crash: float = Field(0.0, ge=0.0, le=1.0, description="probability a site dies after training, before replying")
    straggler: float = Field(0.0, ge=0.0, le=1.0, description="probability a site replies late")
    straggler_delay_s: tuple[float, float] = Field((5.0, 30.0), description="a straggler's extra delay: uniform "
                                                   "in [low, high] seconds; past federation.round_timeout_s the "
                                                   "round is aggregated without it")
    seed: int = 0

    @model_validator(mode="after")
    def _ordered_delay(self) -> "FaultsConfig":
        low, high = self.straggler_delay_s
        if not 0.0 <= low <= high:
            raise ValueError(f"straggler_delay_s must be [low, high] with 0 <= low <= high, got [{low}, {high}]")
        return self


class SimulationConfig(_Section):
    engine: Literal["inprocess", "flower"] = Field(
        "inprocess", description="inprocess (default): Flower's ServerApp and ClientApp in the fedgen process, "
        "sites trained one after another; flower: Flower's simulation runtime (SuperLink, Ray actors), for runs "
        "that need parallel sites (docs/simulation.md, 'Engines')")
    workers: Union[Literal["auto"], int] = Field(
        1, description="inprocess engine: processes that train the sampled sites in parallel; 1 (default): in "
        "the fedgen process, one after another; auto: one per core, capped by the sites per round")
    client_cpus: float = Field(1.0, gt=0.0)
    client_gpus: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_actors: int | None = Field(None, ge=1, description="cap on concurrent Ray actors")
    ray_address: str | None = Field(None, description="engine flower only: run the sites on an existing Ray "
                                    "cluster at this address (host:port, as `ray start --head` prints it) instead "
                                    "of a private Ray (docs/simulation.md, 'A Ray cluster')")
    byzantine: ByzantineConfig | None = Field(None, description="simulate attacking sites (default: none)")
    faults: FaultsConfig | None = Field(None, description="simulate dropouts, crashes, stragglers (default: none)")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"workers must be a whole number >= 1 or 'auto', got {value!r}")

    @model_validator(mode="after")
    def _workers_need_inprocess(self) -> "SimulationConfig":
        if self.workers != 1 and self.engine != "inprocess":
            raise ValueError(f"workers: {self.workers!r} needs engine inprocess; the flower engine runs sites in "
                             "parallel with client_cpus / client_gpus (or set workers: 1)")
        return self

    @field_validator("ray_address")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "://" in value:
            raise ValueError("give the cluster's address as host:port (what `ray start --head` prints after "
                             "--address=), not a Ray Client URL")
        host, sep, port = value.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or " " in host:
            raise ValueError("expected host:port, e.g. 10.0.0.5:6379 (the head node's address and "
                             "`ray start --head --port`)")
        return value.strip()

    @model_validator(mode="after")
    def _ray_settings_need_flower(self) -> "SimulationConfig":
        if self.ray_address is not None and self.engine != "flower":
            raise ValueError(f"ray_address: the {self.engine} engine runs no Ray; set simulation.engine: flower to "
                             "run on the cluster, or remove ray_address")
        if self.engine == "flower" and not float(self.client_cpus).is_integer():
            raise ValueError(f"client_cpus: Flower gives each site's Ray actor whole CPUs; use 1, 2, ... (got "
                             f"{self.client_cpus:g}; client_gpus may be a fraction)")
        return self


class DeploymentConfig(_Section):
    """A deployed federation: the server holds no private data, so the data's shape and
    classes are declared here, and evaluation uses a public reference set (if any)."""

    data_shape: list[int] = Field(..., min_length=1, description="shape of one example, e.g. [1, 8, 8]")
    num_classes: int | None = Field(None, ge=2, description="classes of a conditional model; null = unconditional")
    reference: str | None = Field(None, description="public reference .npz (x, optional y) for server-side "
                                  "evaluation; null = no server-side quality metrics")
    table: TableSchema | None = Field(None, description="tabular data: {columns, label_column, feature_min, "
                                      "feature_max}, the bounds every site scales with; `fedgen sample --out "
                                      "rows.csv` writes these columns in their original units")

    @model_validator(mode="after")
    def _positive_shape(self) -> "DeploymentConfig":
        if any(d < 1 for d in self.data_shape):
            raise ValueError(f"data_shape entries must be >= 1, got {self.data_shape}")
        if self.table is not None and self.data_shape != [len(self.table.columns)]:
            raise ValueError(f"table: {len(self.table.columns)} columns need data_shape [{len(self.table.columns)}], "
                             f"got {self.data_shape}")
        return self


PUBLIC_DIGITS_28 = "digits-28"
PUBLIC_DIGITS_FONTS_28 = "digits-fonts-28"
EMBEDDED_PUBLIC_SETS = {  # embedded (offline, no path): what each holds, for docs and errors
    PUBLIC_DIGITS_28: "scikit-learn's 1 797 digits resized from 8 x 8 to the model's shape",
    PUBLIC_DIGITS_FONTS_28: "scikit-learn's digits and the digits 0-9 printed in the fonts matplotlib ships, "
                            "each fitted into MNIST's 20 x 20 box centred by mass in 28 x 28",
}


class PublicDataConfig(_Section):
    """A dataset the scenario declares public: the server pretrains on it before round 1,
    charged nothing (docs/models.md, "Warm starts"). Embedded sets (no path, offline):
    ``digits-28``, scikit-learn's digits resized to 28 x 28 (or to the model's data shape);
    ``digits-fonts-28``, those digits and printed ones, in MNIST's geometry. Any other name
    is a data format of the ``data`` section, read with its ``path`` and ``options``."""

    format: str = Field(PUBLIC_DIGITS_28, description=f"{' or '.join(EMBEDDED_PUBLIC_SETS)}, or one of: "
                        f"{', '.join(DATA_FORMATS)}")
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="the format's reader options")

    @field_validator("format")
    @classmethod
    def _known(cls, value: str) -> str:
        if value in EMBEDDED_PUBLIC_SETS:
            return value
        if value not in DATA_FORMATS:
            raise ValueError(f"unknown public set {value!r}; embedded: {', '.join(EMBEDDED_PUBLIC_SETS)}; or a data "
                             f"format: {', '.join(sorted(DATA_FORMATS))}")
        return data_format(value).name

    @field_validator("options")
    @classmethod
    def _accepted_by_format(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        fmt = info.data.get("format")
        if fmt is None or fmt in EMBEDDED_PUBLIC_SETS:  # the format's own error / the check below
            return value
        return data_format(fmt).parse(value).model_dump(mode="json")

    @model_validator(mode="after")
    def _path_as_the_format_needs(self) -> "PublicDataConfig":
        if self.format in EMBEDDED_PUBLIC_SETS:
            if self.options or self.path:
                raise ValueError(f"format {self.format} is embedded: it takes no path and no options")
        elif data_format(self.format).needs_path and not self.path:
            raise ValueError(f"path is required for format {self.format!r}")
        return self


class ReleaseWarmStartConfig(_Section):
    """Each site spends ``epsilon_fraction`` of its target epsilon on one DP release (the mmd
    family's mean embedding, and the family's own statistic where it has one); the server
    fits a generator to the combined release and pretrains the model on its samples; DP-SGD
    spends the rest (docs/models.md, "Warm starts")."""

    epsilon_fraction: float = Field(..., description="the fraction of privacy.target_epsilon each site's "
                                    "release spends, in (0, 1); the rest trains by DP-SGD")
    family_share: float = Field(0.5, ge=0.0, lt=1.0, description="the share of the release's squared "
                                "sensitivity given to the family's own statistic (the flow's class means; 0: "
                                "none); families without one ignore it")
    num_features: int = Field(2000, ge=16, description="random features of the released embedding")
    generator_steps: int = Field(1500, ge=1, description="server steps fitting the release's generator")
    samples: int = Field(10000, ge=10, description="generator samples the model is pretrained on")
    generator: dict[str, Any] = Field(default_factory=dict, description="further options of the release's mmd "
                                      "generator (e.g. count_weight, bandwidth, hidden, fit_batch; docs/models.md)")
    screen_samples: bool = Field(False, description="screen the model's samples with the generator's public "
                                 "classifier (generator.public_filter > 0): a sample not recognised as its class "
                                 "is drawn again; post-processing, no epsilon")

    @model_validator(mode="after")
    def _screen_needs_the_public_classifier(self) -> "ReleaseWarmStartConfig":
        if self.screen_samples and not float(self.generator.get("public_filter", 0) or 0) > 0:
            raise ValueError("screen_samples: the screen is the generator's public classifier; set "
                             "warm_start.release.generator.public_filter (e.g. 0.5, with perceptual_weight and "
                             "warm_start.public) or screen_samples: false")
        return self

    @field_validator("epsilon_fraction")
    @classmethod
    def _a_fraction(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError("must lie in (0, 1): the fraction of privacy.target_epsilon the release spends "
                             "(e.g. 0.4); the rest trains by DP-SGD")
        return value


class WarmStartConfig(_Section):
    """Start the global model from something already good before round 1: ``public`` data
    (charged nothing) or a DP ``release`` (charged to the sites' ledgers). One of the two --
    or both when the release's generator has perceptual features
    (``release.generator.perceptual_weight > 0``): then the public set trains that
    generator's perceptual network only, and the family pretrains on the generator's samples."""

    public: PublicDataConfig | None = None
    release: ReleaseWarmStartConfig | None = None
    steps: int = Field(500, ge=1, description="non-private pretraining steps on the server")
    batch_size: int = Field(128, ge=1, description="pretraining batch size")
    lr: float = Field(1e-3, gt=0.0, description="pretraining learning rate (Adam)")

    @property
    def release_perceptual(self) -> bool:
        """Whether the release's generator has perceptual features (trained on ``public``)."""
        return self.release is not None and has_perceptual_features(self.release.generator)

    @model_validator(mode="after")
    def _one_source(self) -> "WarmStartConfig":
        if (self.public is None) == (self.release is None) and not (self.public and self.release_perceptual):
            raise ValueError("give exactly one of public: {format: ...} or release: {epsilon_fraction: ...} (both "
                             "only with release.generator.perceptual_weight > 0)")
        return self


#: DP-SGD families whose round is one private step, then steps that see no data (DP-FedSGD
#: with distributed noise; the GAN's generator step runs at the server, privacy/dp_fedsgd.py)
DP_FEDSGD_FAMILIES = ("vae", "gan", "flow", "diffusion")


def family_has_site_loss(family: str) -> bool:
    """Whether a site can compute ``family``'s per-example training loss on its data (the
    federated evaluation's ``eval-loss``): the DP-SGD families can, release-only ones not."""
    builder = get_model_builder(family)
    return not isinstance(builder, type) or issubclass(builder, DPSGDTrainable)


class Scenario(_Section):
    name: str = Field("scenario", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    federation: FederationConfig = FederationConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfigSection = TrainingConfigSection()
    privacy: PrivacySection = PrivacySection()
    evaluation: EvaluationConfig = EvaluationConfig()
    simulation: SimulationConfig = SimulationConfig()
    deployment: DeploymentConfig | None = None  # set for `fedgen prepare` (real SuperNodes)
    warm_start: WarmStartConfig | None = Field(None, description="pretrain before round 1 on public data or a DP "
                                               "release (docs/models.md, 'Warm starts'); default: none")

    @model_validator(mode="before")
    @classmethod
    def _share_became_a_fraction(cls, data: Any) -> Any:
        """``warm_start.release.epsilon_share`` (an absolute epsilon) became ``epsilon_fraction``
        (of the target), so one scenario runs at any ``privacy.target_epsilon``: say what to write."""
        release = ((data or {}).get("warm_start") or {}).get("release") if isinstance(data, dict) else None
        if isinstance(release, dict) and "epsilon_share" in release:
            share = release["epsilon_share"]
            target = (data.get("privacy") or {}).get("target_epsilon", PrivacySection().target_epsilon)
            fix = f"epsilon_fraction: {share / target:.3g} ({share:g} of privacy.target_epsilon {target:g})" \
                if isinstance(share, (int, float)) and isinstance(target, (int, float)) and target > 0 \
                else "epsilon_fraction: share / privacy.target_epsilon"
            raise ValueError(f"warm_start.release.epsilon_share: the release's share is a fraction of the target "
                             f"now; write {fix}")
        return data

    @model_validator(mode="after")
    def _seeded_noise_only_in_simulation(self) -> "Scenario":
        if self.deployment is not None and self.privacy.seeded_noise:
            raise ValueError("privacy.seeded_noise: a deployed federation's sites draw DP noise from their own OS "
                             "entropy (a known seed would let the server subtract it); remove the key")
        return self

    @model_validator(mode="after")
    def _federated_evaluation_needs_a_loss(self) -> "Scenario":
        if self.evaluation.federated and not family_has_site_loss(self.model.family):
            raise ValueError(f"evaluation.federated: the {self.model.family} family has no per-example loss a site "
                             "could evaluate (it is trained by a release); set evaluation.federated: false and give "
                             "the server a public reference set (deployment.reference) instead")
        return self

    @model_validator(mode="after")
    def _white_box_needs_dp_sgd(self) -> "Scenario":
        if self.privacy.white_box is not None and not self.privacy.example_level:
            raise ValueError("privacy.white_box: gradient canaries go into DP-SGD steps; it needs privacy.enabled: "
                             "true and privacy.unit: example or both")
        return self

    @model_validator(mode="after")
    def _site_level_needs(self) -> "Scenario":
        if self.privacy.unit == "example":
            return self
        if not self.privacy.enabled:
            raise ValueError(f"privacy.unit: {self.privacy.unit!r} needs privacy.enabled: true")
        if self.federation.strategy != "fedavg":
            raise ValueError(f"federation.strategy: site-level DP (privacy.unit: {self.privacy.unit}) aggregates "
                             f"with DP-FedAvg; set strategy: fedavg (got {self.federation.strategy!r})")
        if self.federation.fraction_fit != 1.0:
            raise ValueError("federation.fraction_fit: under site-level DP sites are Poisson-sampled with "
                             "privacy.site_level.sample_rate; leave fraction_fit at 1.0")
        return self

    @model_validator(mode="after")
    def _warm_start_fits(self) -> "Scenario":
        ws = self.warm_start
        perceptual = self.model.perceptual
        if perceptual and (ws is None or ws.public is None):
            raise ValueError("model.perceptual_weight: the perceptual features are trained on a declared-public "
                             "set; add warm_start: {public: {format: digits-28}} (or set perceptual_weight: 0)")
        if ws is not None and ws.release_perceptual and ws.public is None:
            raise ValueError("warm_start.release.generator.perceptual_weight: a release warm start's generator has no "
                             "public set to train perceptual features on; add warm_start.public: {format: "
                             "digits-fonts-28} beside release (or leave perceptual_weight out)")
        if ws is None or (perceptual and ws.release is None):  # mmd's perceptual features: the public set trains them
            return self
        if not family_has_site_loss(self.model.family):
            raise ValueError(f"warm_start: the {self.model.family} family is fitted by a release, not by training "
                             "steps; warm starts are for the DP-SGD families (vae, gan, flow, diffusion)")
        if ws.release is not None:
            if not self.privacy.example_level:
                raise ValueError("warm_start.release: a release warm start spends example-level budget; it needs "
                                 "privacy.enabled: true and privacy.unit: example or both (or warm_start: null)")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_without_site_level(self) -> "Scenario":
        if self.federation.secure_aggregation is not None and self.privacy.enabled and self.privacy.unit != "example":
            raise ValueError(f"federation.secure_aggregation: site-level DP (privacy.unit: {self.privacy.unit}) "
                             "clips and noises each site's update on the server, which secure aggregation hides; "
                             "use privacy.unit: example or remove secure_aggregation")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_needs_dp_sgd_updates(self) -> "Scenario":
        # A release (mmd; warm_start.release) is combined per site by its noise
        # precision (Releasing.combine_releases), which a masked sum cannot do; clipping the
        # release to secure_aggregation.clip_norm would distort it too. With noise:
        # distributed the mmd release is summed exactly instead (privacy/skellam.py).
        sec = self.federation.secure_aggregation
        if sec is None:
            return self
        if sec.noise == "distributed":
            return self._distributed_noise_fits(sec)
        if not family_has_site_loss(self.model.family) or (self.warm_start is not None
                                                           and self.warm_start.release is not None):
            raise ValueError("federation.secure_aggregation: a DP release (the mmd family, "
                             "warm_start.release) is combined per site by the server, which "
                             "secure aggregation hides; train by DP-SGD only, or remove secure_aggregation")
        return self

    def _distributed_noise_fits(self, sec: SecureAggregationConfig) -> "Scenario":
        """noise: distributed needs DP and either a pure release family (mmd) or a DP-SGD
        family whose round is one private step (DP-FedSGD), and bits that hold the sum."""
        if not self.privacy.enabled or self.privacy.unit != "example":
            raise ValueError("federation.secure_aggregation.noise: distributed needs example-level DP "
                             "(privacy.enabled: true, unit: example); use noise: local")
        if self.model.family != "mmd":
            return self._dp_fedsgd_fits()
        # The only warm start an mmd scenario takes (_warm_start_fits) is the public set of its
        # perceptual features: it trains the feature network, and the site still bounds each
        # record's whole vector to norm 1, so the distributed plan below is unchanged.
        perceptual = self.model.perceptual
        if self.privacy.white_box is not None:
            # the distributed release takes no canaries (client/training.py) and the site's
            # own share is not the Gaussian release the release-canary audit tests: its bound
            # and verdict would be about nothing this run released
            raise ValueError("privacy.white_box: the release-canary audit tests a Gaussian release with "
                             "noise: local; it does not audit a distributed Skellam release (remove "
                             "privacy.white_box or use noise: local)")
        from fedgen.privacy.skellam import BitsTooSmall, plan_distributed_release

        dim = int(self.model.options.get("num_features", 4000)) + 1 + (perceptual_dim() if perceptual else 0)
        try:  # 1 000 classes: a generous size, so the server's plan for the real one fits too
            plan_distributed_release(epsilon=self.privacy.target_epsilon, delta=self.privacy.delta, bits=sec.bits,
                                     num_sites=self.federation.num_sites, threshold=sec.threshold,
                                     max_records=sec.max_records, dim=dim, size=dim * 1000)
        except BitsTooSmall as err:
            raise ValueError(f"federation.secure_aggregation.bits: {err}") from None
        return self

    def _dp_fedsgd_fits(self) -> "Scenario":
        """DP-FedSGD (privacy/dp_fedsgd.py): one private step a round, a family whose round is
        that one step (one linear statistic: the sum of clipped per-record gradients); after a
        public warm start, or a release warm start whose release is summed with distributed
        noise too (contract/task.py, DistributedNoise)."""
        family = self.model.family
        if family not in DP_FEDSGD_FAMILIES:
            raise ValueError(f"federation.secure_aggregation.noise: distributed works for the mmd release and for "
                             f"DP-FedSGD of {', '.join(DP_FEDSGD_FAMILIES)}, not {family} (its round is not one "
                             "linear statistic); use noise: local")
        if self.training.local_steps != 1:
            raise ValueError(f"training.local_steps: noise: distributed with {family} runs DP-FedSGD, exactly one "
                             f"private step a round; set training.local_steps: 1 (not {self.training.local_steps})")
        if (d_steps := self.model.options.get("d_steps_per_g_step", 1)) != 1 and family == "gan":
            raise ValueError(f"model.d_steps_per_g_step: noise: distributed runs DP-FedSGD, one private "
                             f"(discriminator) step a round; set model.d_steps_per_g_step: 1 (not {d_steps})")
        release = None if self.warm_start is None else self.warm_start.release
        if release is not None and release.family_share > 0 and family == "flow":
            # the distributed release rounds each record's row of the head's embedding; the
            # flow's class means beside it in one joint row are not wired to that rounding
            raise ValueError("warm_start.release.family_share: with noise: distributed the release is the "
                             "generator's embedding alone; set warm_start.release.family_share: 0")
        if self.privacy.white_box is not None:
            raise ValueError("privacy.white_box: the white-box audit adds its canaries to local DP-SGD steps; "
                             "it does not audit DP-FedSGD with noise: distributed (remove privacy.white_box)")
        return self

    def resolved(self) -> dict[str, Any]:
        """Every key with its value, defaults included (what ``scenario.yaml`` records)."""
        d = self.model_dump(mode="json")
        d["model"] = {"family": self.model.family, **self.model.options}
        return d


# -- loading, overrides ---------------------------------------------------------------

def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; every key, its type and default: simulations/scenario.py)"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if not first["loc"]:  # a check across sections names its keys itself
        return f"{source}: {msg}{more}"
    return f"{source}: {loc}: {msg}{more}"


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (``10`` -> int, ``1e-5`` -> float, ``true`` -> bool)."""
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", text.strip()):
        return float(text)  # YAML 1.1 reads 1e-5 as a string
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw scenario dict (returns a new dict)."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ScenarioError(f"--set {item!r}: empty key")
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ScenarioError(f"--set {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return out


def read_scenario_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ScenarioError(f"{path}: scenario file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ScenarioError(f"{path}: not valid YAML{where}") from None
    if not raw:
        raise ScenarioError(f"{path}: the scenario is empty; start from scenarios/quickstart.yaml and change "
                            "what differs (every key and its default: simulations/scenario.py)")
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario must be a mapping of sections (data:, federation:, ...)")
    return raw


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario; errors are one-line :class:`ScenarioError`."""
    raw = apply_overrides(read_scenario_file(path), overrides or [])
    raw.setdefault("name", Path(path).stem)
    return scenario_from_dict(raw, source=str(path))


def scenario_from_dict(raw: dict[str, Any], source: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(_format_error(err, source)) from None
