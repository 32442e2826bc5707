"""The Gaussian release (privacy/release.py) and the DP-SGD budget (privacy/budget.py): the
mechanisms live in privacy/, and only privacy/ writes a site's ledger (issue #20)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fedgen.privacy.accounting import affordable_steps, calibrate_after, calibrate_noise_multiplier
from fedgen.privacy.ledger import SiteLedger

REPO = Path(__file__).resolve().parent.parent


def _ledger(target_epsilon: float = 2.0) -> SiteLedger:
    return SiteLedger(site="7", accountant="rdp", delta=1e-5, target_epsilon=target_epsilon, max_grad_norm=1.0)


def test_finding20_gaussian_release_is_the_sum_plus_calibrated_noise_from_the_given_generator():
    from fedgen.privacy.release import GaussianRelease, plan_release, release_sum

    ledger = _ledger()
    release = plan_release(ledger, epsilon=2.0, delta=1e-5, accountant="rdp", whole_budget=True)
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=1.0, steps=1, accountant="rdp")
    assert release == GaussianRelease(sigma)
    assert (ledger.noise_multiplier, ledger.sample_rate) == (sigma, 1.0)  # the whole budget: the ledger's sigma
    total = torch.arange(12.0).reshape(3, 4)
    noised = release_sum(total, release, ledger, generator=torch.Generator().manual_seed(5), round=1, run="42")
    expected = total + sigma * torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noised, expected)  # exactly the caller's generator's draws, nothing else
    assert ledger.accountant_history() == [(sigma, 1.0, 1)] and ledger.history[0].run == "42"
    assert 1.9 <= ledger.epsilon <= 2.0
    # the budget is spent: a second release is refused and nothing is charged
    assert plan_release(ledger, epsilon=2.0, delta=1e-5, accountant="rdp", whole_budget=True) is None
    assert ledger.steps == 1


def test_a_hybrids_release_leaves_the_dp_sgd_sigma_to_the_budget():
    from fedgen.privacy.budget import affordable_dp_sgd_steps, charge_dp_sgd_round, dp_sgd_noise_multiplier
    from fedgen.privacy.release import plan_release, release_sum

    ledger = _ledger(target_epsilon=3.0)
    release = plan_release(ledger, epsilon=1.0, delta=1e-5, accountant="rdp", whole_budget=False)
    assert release is not None and ledger.noise_multiplier is None
    release_sum(torch.zeros(2), release, ledger, generator=torch.Generator().manual_seed(0), round=1, run=None)
    with pytest.raises(ValueError, match="not calibrated"):
        affordable_dp_sgd_steps(ledger, wanted=5)

    sigma = dp_sgd_noise_multiplier(ledger, sample_rate=0.1, planned_steps=50, target_epsilon=3.0, delta=1e-5,
                                    accountant="rdp")
    history = [(release.noise_multiplier, 1.0, 1)]
    assert sigma == calibrate_after(history, target_epsilon=3.0, delta=1e-5, sample_rate=0.1, steps=50,
                                    accountant="rdp")
    assert affordable_dp_sgd_steps(ledger, wanted=50) == affordable_steps(
        history, noise_multiplier=sigma, sample_rate=0.1, wanted=50, delta=1e-5, target_epsilon=3.0, accountant="rdp")
    charge_dp_sgd_round(ledger, round=2, steps=50, run=None)
    assert ledger.accountant_history() == history + [(sigma, 0.1, 50)] and ledger.epsilon <= 3.0
    # calibrated once: a later round keeps sigma, and a site whose data changed size accounts at its new rate
    assert dp_sgd_noise_multiplier(ledger, sample_rate=0.2, planned_steps=1, target_epsilon=3.0, delta=1e-5,
                                   accountant="rdp") == sigma
    assert ledger.sample_rate == 0.2


def test_set_target_epsilon_keeps_the_ledger_json_format():
    ledger = _ledger()
    before = set(ledger.to_dict())
    ledger.set_target_epsilon(0.5)
    assert ledger.to_dict()["target_epsilon"] == 0.5 and set(ledger.to_dict()) == before
    assert SiteLedger.from_json(ledger.to_json()).target_epsilon == 0.5


def _ledger_writes(path: Path) -> list[str]:
    """Each place in ``path`` that assigns an attribute of a ``*ledger*`` object or records a spend."""
    writes = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in (t for t in targets for t in (t.elts if isinstance(t, ast.Tuple) else [t])):
            if isinstance(target, ast.Attribute) and "ledger" in ast.unparse(target.value).lower():
                writes.append(f"{path.name}:{node.lineno}: {ast.unparse(target)} = ...")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "record_round":
            writes.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}(...)")
    return writes


def test_finding20_only_privacy_writes_a_sites_ledger():
    """The client loop calls privacy/'s operations; it never sets a ledger field or records a spend."""
    writes = [w for path in sorted((REPO / "client").glob("*.py")) for w in _ledger_writes(path)]
    assert writes == []
    assert _ledger_writes(REPO / "privacy" / "budget.py")  # the scan does see writes where they belong
