"""Privacy error types. Messages name the setting, the problem and the fix."""


class PrivacyError(Exception):
    """Base class of fedgen's privacy errors."""


class PrivacyBudgetExceeded(PrivacyError):
    """A site would exceed its target epsilon by taking another DP-SGD step."""


class PrivacyConfigError(PrivacyError, ValueError):
    """A privacy setting cannot be honoured (e.g. a target that no noise level reaches)."""


class SiteIdError(PrivacyError, ValueError):
    """A site name that could escape the folder it names (``..``, ``/``) or is not a plain name."""
