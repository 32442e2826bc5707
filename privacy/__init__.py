"""Differential privacy: DP-SGD wiring (Opacus), calibration, accountants, the privacy
ledger, and the audit (``privacy.audit``)."""

from .accounting import affordable_steps, calibrate_noise_multiplier, epsilon_of, make_accountant
from .errors import PrivacyBudgetExceeded, PrivacyConfigError, PrivacyError
from .ledger import PrivacyLedger, RoundSpend, SiteLedger

__all__ = [
    "PrivacyBudgetExceeded",
    "PrivacyConfigError",
    "PrivacyError",
    "PrivacyLedger",
    "RoundSpend",
    "SiteLedger",
    "affordable_steps",
    "calibrate_noise_multiplier",
    "epsilon_of",
    "make_accountant",
]
