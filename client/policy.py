"""The site's privacy policy: what a site will train under, whatever the server asks.

Example-level DP protects a site's records from everyone downstream of the site, the
coordinator included (docs/deploy.md, "Threat model"). So the server's task is a
*request*: the site applies its own policy, fixed in its SuperNode's ``--node-config``,
and the task may only make the guarantee stronger (a lower epsilon), never weaker:

| node-config key | default (deployed site) | a task that asks for less is |
|---|---|---|
| ``max-epsilon`` | none (the task's target) | capped to it |
| ``max-delta`` | ``1e-5`` | refused |
| ``accountant`` | the task's (``rdp`` or ``prv``) | run with the site's accountant |
| ``require-dp`` | ``true`` | refused when it turns DP off (``privacy.enabled: false``, ``unit: site``) |
| seeded noise | never | refused: DP noise and sampling come from the site's OS entropy |
| ``trust-secagg-abort`` | ``false`` | -- (a secure-aggregation round the server says it aborted stays charged) |

``trust-secagg-abort``: under secure aggregation a site's spend is *pending* while its
masked input is out, and the server's ``abort`` (fewer than the threshold survived) would
withdraw it. The site cannot verify that claim: a server that deviates from the protocol
could ask the site's neighbours for its shares, decode its input and still tell the site
"aborted" (docs/aggregation.md, "Aborted rounds"). So a deployed site keeps the charge
unless its operator trusts the coordinator to follow the protocol (``true``).

Whatever the policy, ``delta`` must be below ``1 / n`` for the site's ``n`` records
(at ``delta >= 1/n`` a mechanism may publish a record outright and still be "DP").

A *simulated* node (no ``data-path`` in its node config: the harness gives it a
partition of the researcher's own data) takes the scenario as its policy: DP may be off
and seeded noise may be asked for, which the run then flags as no guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from fedgen.privacy.accounting import ACCOUNTANTS

from .errors import DataError
from .training import PrivacyConfig

DEFAULT_MAX_DELTA = 1e-5


class PolicyRefusal(Exception):
    """The server's task asks for less privacy than the site's policy allows. The message
    is sent to the server: it names the setting and the site's bound, never data."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site will train under (keyword-only use; see the module docstring)."""

    require_dp: bool = True
    max_epsilon: float | None = None
    max_delta: float = DEFAULT_MAX_DELTA
    accountant: str | None = None  # None: the task's
    allow_seeded_noise: bool = False
    trust_secagg_abort: bool = False  # withdraw a pending spend on the server's word that the round aborted

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> "SitePolicy":
        """The policy of the node: strict for a deployed site (``data-path`` set), the
        scenario's own for a simulated one. Bad values raise a one-line :class:`DataError`."""
        simulated = "data-path" not in node_config
        base = (cls(require_dp=False, max_delta=1.0, allow_seeded_noise=True, trust_secagg_abort=True) if simulated
                else cls())
        return replace(
            base,
            max_epsilon=_positive(node_config, "max-epsilon", base.max_epsilon),
            max_delta=_positive(node_config, "max-delta", base.max_delta, below_one=True),
            require_dp=_boolean(node_config, "require-dp", base.require_dp),
            accountant=_accountant(node_config, base.accountant),
            trust_secagg_abort=_boolean(node_config, "trust-secagg-abort", base.trust_secagg_abort),
        )

    def apply(self, privacy: PrivacyConfig, *, num_examples: int) -> PrivacyConfig:
        """The privacy settings the site trains under, or :class:`PolicyRefusal`."""
        if not privacy.enabled:
            if self.require_dp:
                raise PolicyRefusal("site policy requires example-level DP (require-dp); the task turned it off "
                                    "(privacy.enabled: false or privacy.unit: site)")
            return privacy
        if privacy.seeded_noise and not self.allow_seeded_noise:
            raise PolicyRefusal("site policy: DP noise and sampling come from the site's OS entropy; the task "
                                "asked for seeded noise (privacy.seeded_noise is a simulation-only option)")
        if not 0.0 < privacy.delta <= self.max_delta:
            raise PolicyRefusal(f"the task's delta {privacy.delta:g} exceeds the site's max-delta "
                                f"{self.max_delta:g}")
        if privacy.delta >= 1.0 / num_examples:
            raise PolicyRefusal(f"the task's delta {privacy.delta:g} is not below 1/n for this site's data "
                                "(a delta that large allows publishing a record outright); use delta << 1/n")
        target = privacy.target_epsilon if self.max_epsilon is None else min(privacy.target_epsilon,
                                                                           self.max_epsilon)
        return replace(privacy, target_epsilon=target, accountant=self.accountant or privacy.accountant)


def _positive(cfg: Mapping[str, object], key: str, default: float | None, *, below_one: bool = False) -> float | None:
    value = cfg.get(key)
    if value is None or str(value) == "":
        return default
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not (number > 0 and (number < 1 or not below_one) and number != float("inf")):
        bound = "a number in (0, 1)" if below_one else "a positive number"
        raise DataError(f"--node-config {key}={value!r}: expected {bound}")
    return number


def _boolean(cfg: Mapping[str, object], key: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None or str(value) == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise DataError(f"--node-config {key}={value!r}: expected true or false")
    return text == "true"


def _accountant(cfg: Mapping[str, object], default: str | None) -> str | None:
    value = cfg.get("accountant")
    if value is None or str(value) == "":
        return default
    if str(value) not in ACCOUNTANTS:
        raise DataError(f"--node-config accountant={value!r}: expected one of {', '.join(ACCOUNTANTS)}")
    return str(value)
