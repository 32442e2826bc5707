"""benchmarks/sampler_selection.py: a sampler's knobs are chosen on the validation half alone
(docs/benchmarks.md, "Choosing the sampler on a validation half")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from torch import nn

from fedgen.shared_models.registry import build_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def selection():
    spec = importlib.util.spec_from_file_location("sampler_selection", REPO / "benchmarks" / "sampler_selection.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_choice_reads_validation_only(selection):
    rows = [{"guidance_scale": 1.0, "validation_accuracy": 0.80, "test_accuracy": 0.95},
            {"guidance_scale": 1.25, "validation_accuracy": 0.90, "test_accuracy": 0.70},
            {"guidance_scale": 2.0, "validation_accuracy": 0.90, "test_accuracy": 0.99}]
    assert selection.choose(rows)["guidance_scale"] == 1.25  # best validation, first on a tie; test ignored


def test_grid_parsing_and_its_refusals(selection):
    assert selection.parse_grid(["guidance_scale=1,1.5", "ddim_eta=0"]) == {"guidance_scale": [1.0, 1.5],
                                                                           "ddim_eta": [0.0]}
    for bad in ("guidance_scale", "guidance_scale=", "guidance_scale=high"):
        with pytest.raises(SystemExit, match="KNOB=V1,V2"):
            selection.parse_grid([bad])


def test_the_knobs_are_found_on_a_wrapped_family(selection):
    diffusion = build_model("diffusion", data_shape=(1, 8, 8), num_classes=3, architecture="mlp", hidden=16)

    class Wrapper(nn.Module):  # a warm start holds its family as ``inner``
        def __init__(self) -> None:
            super().__init__()
            self.inner = diffusion

    assert selection.sampling_family(Wrapper(), ["guidance_scale", "ddim_eta"]) is diffusion
    with pytest.raises(SystemExit, match="no sampling knob.*temperature"):
        selection.sampling_family(Wrapper(), ["temperature"])
