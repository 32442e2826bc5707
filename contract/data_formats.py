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

from pydantic import BaseModel, ConfigDict, Field, ValidationError


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


def recorded_options(fmt: str, options: Mapping[str, Any], base: Path | None = None) -> dict[str, Any]:
    """``options`` as a run records them: every option with its value (defaults filled),
    file-valued options made absolute against ``base`` (the working directory by default),
    so a site process started elsewhere reads the same files."""
    parsed = data_format(fmt).parse(options).model_dump(mode="json")
    for name in PATH_OPTIONS & set(parsed):
        if parsed[name] is not None:
            parsed[name] = str((Path(base or Path.cwd()) / parsed[name]).resolve())
    return parsed
