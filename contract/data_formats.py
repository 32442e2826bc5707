"""The data formats a site can read, each with its options declared once.

One registry serves simulation and deployment alike (docs/simulation.md "Your own data",
docs/deploy.md): a scenario's ``data: {format, path, options}`` is validated against it,
a deployed site's ``--node-config`` keys are the options' names in kebab-case
(:func:`node_config_key`: ``label_column`` -> ``label-column``), and the readers in
``client/data.py`` take the validated options object. The harness records the options in
``inputs/site_data.json`` so a simulated site re-reads its data exactly as the harness did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class DataOptions(BaseModel):
    """A format's reader options (no options: this base class itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CsvOptions(DataOptions):
    """CSV reader options (client/data.py ``read_csv``)."""

    label_column: str | int | None = Field(None, description="header name (or 0-based index) of the integer "
                                           "label column; null = unlabelled")
    feature_min: float | list[float] | str | None = Field(None, description="min-max scaling lower bound: one "
                                                          "number, or one per feature column (\"0,0,1\")")
    feature_max: float | list[float] | str | None = Field(None, description="min-max scaling upper bound, as "
                                                          "feature_min")
    feature_stats: str | None = Field(None, description="JSON file {\"min\": [...], \"max\": [...]} instead of "
                                      "feature_min / feature_max")
    feature_clip: bool = Field(False, description="clip scaled values into [0, 1] instead of rejecting the file")


class ImageOptions(DataOptions):
    """Image-folder reader options (client/data.py ``read_image_folder``)."""

    image_classes: list[str] | str | None = Field(None, description="class names in label order "
                                                  "(\"benign,malignant\"); default: integer folder names, else "
                                                  "sorted folder names")
    image_mode: Literal["L", "RGB"] | None = Field(None, description="L (grayscale) or RGB; default: L when "
                                                   "every image is grayscale")


# file-valued options, resolved against the working directory when a run records them
PATH_OPTIONS = frozenset({"feature_stats"})


@dataclass(frozen=True)
class DataFormat:
    """One registered format: its name, its options and whether it reads a path."""

    name: str
    options: type[DataOptions]
    needs_path: bool = True

    @property
    def option_names(self) -> list[str]:
        return list(self.options.model_fields)

    def parse(self, options: Mapping[str, Any] | None) -> DataOptions:
        """``options`` validated; kebab-case keys (as ``--node-config`` spells them) are
        accepted. A :class:`ValueError` of one line names what is wrong and what is accepted."""
        given = {option_name(k): v for k, v in (options or {}).items()}
        unknown = sorted(set(given) - set(self.option_names))
        if unknown:
            accepted = ", ".join(self.option_names) or "none"
            raise ValueError(f"option(s) {', '.join(unknown)} not accepted by data format {self.name!r}; "
                             f"accepted: {accepted}")
        try:
            return self.options.model_validate(given)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"option {where} of data format {self.name!r}: {first['msg']} "
                             f"(got {first.get('input')!r})") from None


DATA_FORMATS: dict[str, DataFormat] = {fmt.name: fmt for fmt in (
    DataFormat("digits", DataOptions, needs_path=False),
    DataFormat("breast-cancer", DataOptions, needs_path=False),
    DataFormat("mnist", DataOptions),
    DataFormat("npz", DataOptions),
    DataFormat("csv", CsvOptions),
    DataFormat("images", ImageOptions),
)}


def data_format(name: str) -> DataFormat:
    """The registered format ``name``; a one-line :class:`ValueError` listing them otherwise."""
    try:
        return DATA_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown data format {name!r}; supported: {', '.join(sorted(DATA_FORMATS))}") from None


def node_config_key(option: str) -> str:
    """A reader option's ``--node-config`` key at a deployed site: its name in kebab-case."""
    return option.replace("_", "-")


def option_name(key: str) -> str:
    """The reader option a ``--node-config`` key (or an option name) names."""
    return key.replace("-", "_")


#: every reader option's --node-config key -> the option (docs/deploy.md's node-config table)
NODE_CONFIG_KEYS: dict[str, str] = {node_config_key(o): o for f in DATA_FORMATS.values() for o in f.option_names}

#: the site's other --node-config keys (docs/deploy.md §3): where its data and state are,
#: its name and its privacy policy (client/policy.py reads the last four)
SITE_NODE_KEYS: tuple[str, ...] = ("data-path", "data-format", "site-id", "state-dir",
                                   "max-epsilon", "max-delta", "accountant", "require-dp")


@dataclass(frozen=True)
class SiteDataConfig:
    """How a deployed site reads its data: the format, the path and the reader options."""

    format: str
    path: str
    options: dict[str, Any]


def infer_format(path: str) -> str:
    """The format a ``data-path`` implies when ``data-format`` is not given."""
    return "npz" if path.endswith(".npz") else "csv" if path.endswith(".csv") else "mnist"


def site_data_config(node_config: Mapping[str, Any], *, strict: bool = False) -> SiteDataConfig:
    """The reader a deployed site's ``--node-config`` describes: ``data-path``, ``data-format``
    (default from the file name) and the reader options in kebab-case (``feature-stats`` ->
    ``feature_stats``). ``strict``: a key that is neither a site key nor a reader option is a
    one-line :class:`ValueError` listing the accepted keys (``fedgen check-data``; a
    SuperNode's node config also carries Flower's own keys, so the site itself is lenient)."""
    if strict:
        unknown = sorted(k for k in node_config if k not in SITE_NODE_KEYS and k not in NODE_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"--node-config key(s) {', '.join(unknown)} not known; accepted: "
                             f"{', '.join((*SITE_NODE_KEYS, *NODE_CONFIG_KEYS))}")
    if not node_config.get("data-path"):
        raise ValueError("--node-config has no data-path; give data-path=\"/path/to/data\"")
    path = str(node_config["data-path"])
    fmt = str(node_config.get("data-format") or infer_format(path))
    options = {NODE_CONFIG_KEYS[k]: v for k, v in node_config.items() if k in NODE_CONFIG_KEYS}
    return SiteDataConfig(format=data_format(fmt).name, path=path, options=options)


def parse_node_config(text: str) -> dict[str, Any]:
    """``--node-config``'s text, ``key=value`` pairs separated by spaces, values in TOML
    syntax as Flower reads them (``"text"``, ``8.0``, ``true``); an unquoted value is taken
    as text. A one-line :class:`ValueError` for a pair without ``=``."""
    import re

    try:
        import tomllib
    except ImportError:  # Python 3.10: Flower depends on tomli, the same parser
        import tomli as tomllib

    out: dict[str, Any] = {}
    pair = re.compile(r"""\s*([^\s=]+)=("(?:[^"\\]|\\.)*"|'[^']*'|[^\s"']*)(?=\s|$)""")
    pos, text = 0, text.strip()
    while pos < len(text):
        match = pair.match(text, pos)
        if match is None:
            bad = text[pos:].split()[0]
            raise ValueError(f"--node-config: {bad!r} is not key=value (quote text values: key=\"value\")")
        key, value = match.groups()
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value.strip("\"'")
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


class TableSchema(BaseModel):
    """A table's columns and their declared bounds (``deployment.table``; recorded in
    ``inputs/site_data.json``): the feature columns in order, the label column, and each
    feature's public [min, max] -- the bounds the sites scale with, so ``fedgen sample``
    can write rows in the original units and clamp them inside the bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: list[str] = Field(..., min_length=1, description="feature column names, in order (no label)")
    label_column: str | None = Field(None, description="name of the label column; null = unlabelled")
    feature_min: list[float] | float = Field(..., description="each column's declared lower bound (or one for all)")
    feature_max: list[float] | float = Field(..., description="each column's declared upper bound (or one for all)")

    @model_validator(mode="after")
    def _bounds_per_column(self) -> "TableSchema":
        n = len(self.columns)
        if len(set(self.columns)) != n:
            raise ValueError("columns: names must be distinct")
        if self.label_column is not None and self.label_column in self.columns:
            raise ValueError(f"label_column {self.label_column!r} is also listed in columns")
        lo, hi = self.bounds()
        for name, values in (("feature_min", lo), ("feature_max", hi)):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values; columns has {n}")
        bad = [c for c, a, b in zip(self.columns, lo, hi) if not b > a]
        if bad:
            raise ValueError(f"feature_max must exceed feature_min for every column; not for {', '.join(bad[:5])}")
        return self

    def bounds(self) -> tuple[list[float], list[float]]:
        """(lower, upper), one value per column."""
        n = len(self.columns)
        lo = [float(self.feature_min)] * n if isinstance(self.feature_min, (int, float)) else list(self.feature_min)
        hi = [float(self.feature_max)] * n if isinstance(self.feature_max, (int, float)) else list(self.feature_max)
        return lo, hi


def recorded_options(fmt: str, options: Mapping[str, Any], base: Path | None = None) -> dict[str, Any]:
    """``options`` as a run records them: every option with its value (defaults filled),
    file-valued options made absolute against ``base`` (the working directory by default),
    so a site process started elsewhere reads the same files."""
    parsed = data_format(fmt).parse(options).model_dump(mode="json")
    for name in PATH_OPTIONS & set(parsed):
        if parsed[name] is not None:
            parsed[name] = str((Path(base or Path.cwd()) / parsed[name]).resolve())
    return parsed
