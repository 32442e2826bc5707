"""Site-level DP as a strategy wrapper: DP-FedAvg (McMahan et al. 2018) around the
federation's strategy, in the shape of Flower's ``DifferentialPrivacyServerSideFixedClipping``.

:class:`SiteLevelDPStrategy` adds to the two training calls of a Message-API strategy:

* ``configure_train`` Poisson-samples the connected sites with a secret RNG
  (``SiteLevelDP.sample``), not the inner strategy's "fraction of the nodes";
* ``aggregate_train`` clips every site's update, sums, adds Gaussian noise and divides by
  the fixed denominator ``q N`` (``SiteLevelDP.release``), not the inner strategy's mean.

The mechanism, its accounting and why each step is what the guarantee needs are in
``privacy/site_level.py`` and docs/aggregation.md; :class:`FederatedRun` asks the wrapper
whether one more round fits the budget (:meth:`can_release`) and what a round did
(:attr:`round_report`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgen.privacy.site_level import SiteLevelDP

from .record import SiteLevelRound

log = logging.getLogger(__name__)


class SiteLevelDPStrategy(Strategy):
    """DP-FedAvg around ``inner``: Poisson sampling with ``sampling_rng`` (anything with
    ``random()``), clipping and noise from ``noise_rng``, the fixed denominator ``q N``.

    The inner strategy is used only where it cannot touch the guarantee: evaluation
    (``configure_evaluate`` / ``aggregate_evaluate``, whose metrics are outside it) and its
    summary. Its training calls are *not* used: its node sampling ("a fraction of the
    nodes", from Python's shared ``random``) is neither Poisson nor secret, so the
    amplification-by-subsampling bound would not hold; and its example-weighted mean
    divides by what the replies claim, so one site's weight -- and the number of sites
    that happened to reply -- would move the release by more than the clip norm ``C``.
    Clipping the replies and then calling the inner ``aggregate_train`` (Flower's fixed
    clipping wrapper does) is therefore not the DP estimator either.

    ``sampling_rng`` and ``noise_rng`` must be secret from anyone the guarantee is for: a
    ``random.SystemRandom`` and an OS-seeded generator, unless a simulation opted in to
    seeded noise (``FederatedRun`` decides).
    """

    def __init__(self, inner: Strategy, mechanism: SiteLevelDP, *, sampling_rng: Any, noise_rng: np.random.Generator,
                 min_sites: int = 1, wait_s: float = 0.0) -> None:
        super().__init__()
        self.inner = inner
        self.mechanism = mechanism
        self.sampling_rng = sampling_rng
        self.noise_rng = noise_rng
        self.min_sites = min_sites
        self.wait_s = wait_s
        self.current_arrays = ArrayRecord()  # the global model the round's updates are relative to
        self.round_report: SiteLevelRound | None = None  # what the last release did

    def __repr__(self) -> str:
        return f"SiteLevelDPStrategy({self.inner!r}, sigma={self.mechanism.noise_multiplier:g})"

    # -- the budget -------------------------------------------------------------------------
    def can_release(self) -> bool:
        """Whether one more noised round stays within the site-level target epsilon."""
        return self.mechanism.can_release()

    # -- training ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One train message to every connected site the Poisson draw includes (waiting up
        to ``wait_s`` for ``min_sites`` to connect); possibly none."""
        self.current_arrays = arrays
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in self.mechanism.sample(self._connected(grid), self.sampling_rng)]

    def _connected(self, grid: Grid) -> list[int]:
        deadline = time.time() + self.wait_s
        while len(nodes := list(grid.get_node_ids())) < self.min_sites and time.time() < deadline:
            log.info("waiting for sites: %d connected, %d required", len(nodes), self.min_sites)
            time.sleep(1.0)
        return nodes

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The noised release from the valid ``replies`` -- also when there are none: a
        sampled site that failed counts as a zero update, and skipping the release would
        reveal that nobody replied (privacy/site_level.py)."""
        updates = [{k: v.numpy() for k, v in next(iter(m.content.array_records.values())).items()} for m in replies]
        new, info = self.mechanism.release({k: v.numpy() for k, v in self.current_arrays.items()}, updates,
                                           self.noise_rng)
        norms = info["site_update_norms"]
        self.round_report = SiteLevelRound(sites_clipped=info["sites_clipped"],
                                           site_level_epsilon=info["site_level_epsilon"],
                                           site_update_norm_median=float(np.median(norms)) if norms else None)
        log.info("round %d: site-level DP release (%d updates, %d clipped, epsilon %.4g)", server_round,
                 len(updates), info["sites_clipped"], info["site_level_epsilon"])
        metrics = MetricRecord({"sites-clipped": int(info["sites_clipped"]),
                                "site-level-epsilon": float(info["site_level_epsilon"])})
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()}), metrics

    # -- evaluation and summary: the inner strategy's (outside the guarantee) ----------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        m = self.mechanism
        log.info("site-level DP: clip norm %g, noise multiplier %g, sample rate %g, %d sites, target epsilon %g",
                 m.clip_norm, m.noise_multiplier, m.sample_rate, m.num_sites, m.target_epsilon)
        self.inner.summary()
