"""The embedded public sets (simulations/warm_start.py; docs/models.md, "Warm starts") and
the augmentation the perceptual network trains with (shared_models/perceptual.py): what
``digits-fonts-28`` holds, MNIST's geometry, the distortions, and (slow) what a network
trained on it alone recognises of real MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from fedgen.client.data import read_mnist
from fedgen.contract.errors import ScenarioError
from fedgen.contract.scenario import scenario_from_dict
from fedgen.shared_models.perceptual import PerceptualFeatures, distort, train_on_public
from fedgen.simulations.cli import main as fedgen
from fedgen.simulations.warm_start import digits_28, digits_fonts_28, mnist_geometry, printed_digits

from .conftest import REPO


def _ink_box(x: np.ndarray, threshold: float = 0.1) -> tuple[int, int]:
    rows, cols = np.nonzero(x > threshold)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def _centre_of_mass(x: np.ndarray) -> tuple[float, float]:
    rows, cols = np.mgrid[:x.shape[0], :x.shape[1]]
    return float((rows * x).sum() / x.sum()), float((cols * x).sum() / x.sum())


def test_printed_digits_cover_every_digit_in_many_fonts():
    glyphs, labels = printed_digits()
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() == counts.max() >= 15  # every font draws all ten
    assert len(glyphs) == len(labels)
    # real glyphs, not one missing-glyph box repeated: the ten digits of a font differ
    first_font = [torch.from_numpy(mnist_geometry(g)) for g in glyphs[:10]]
    assert min(float((a - b).abs().mean()) for i, a in enumerate(first_font) for b in first_font[i + 1:]) > 0.02


def test_digits_fonts_28_is_in_mnists_geometry():
    x, y = digits_fonts_28()
    handwritten = len(digits_28()[0])
    assert x.shape[1:] == (1, 28, 28) and x.dtype == np.float32 and len(x) == len(y) > handwritten
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y, minlength=10).min() >= 190
    for image in x[:: max(1, len(x) // 200), 0]:  # every kind: handwritten and printed
        height, width = _ink_box(image)
        assert max(height, width) in (19, 20, 21) and min(height, width) >= 2
        row, col = _centre_of_mass(image)
        assert abs(row - 13.5) <= 1.0 and abs(col - 13.5) <= 1.0


@pytest.mark.parametrize("source", ["digits-28 (fills the frame)", "digits-fonts-28 (MNIST's 20 px box)"])
def test_the_augmentation_brings_either_framing_to_mnists_digit_size(source):
    """digits-28 fills its 28 x 28 frame, digits-fonts-28 a 20 px box: the distortions scale
    each image's own ink, so both land near MNIST's 20 px (a fixed zoom would leave one of
    them at 12-18 px or 17-25 px)."""
    x = torch.from_numpy(digits_28()[0][:300] if source.startswith("digits-28") else digits_fonts_28()[0][-300:])
    out = distort(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    sizes = np.array([max(_ink_box(img)) for img in out[:, 0].numpy()])
    assert 18.0 <= np.median(sizes) <= 23.0  # 16-22 px, widened by rotation, shear and strokes
    assert np.percentile(sizes, 10) >= 14 and np.percentile(sizes, 90) <= 26
    again = distort(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # deterministic given the generator
    assert not torch.equal(out, distort(x, torch.Generator().manual_seed(1)))


def _scenario(tmp_path, public: str, **model) -> str:
    raw = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    raw["model"] = {"family": "mmd", "perceptual_weight": 0.5, **model}
    raw["warm_start"] = {"public": {"format": public}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_digits_fonts_28_on_another_shape_is_one_line_naming_the_key(tmp_path, capsys):
    """The quickstart's data are 8 x 8: digits-fonts-28 is drawn in MNIST's 28 x 28 frame."""
    assert fedgen(["validate", _scenario(tmp_path, "digits-fonts-28")]) == 2
    err = capsys.readouterr().err.strip()
    assert "warm_start.public: digits-fonts-28 holds grey 28 x 28 images" in err and "use digits-28" in err
    assert "\n" not in err and "Traceback" not in err


def test_an_unknown_public_set_lists_the_embedded_ones():
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict({"model": {"family": "mmd", "perceptual_weight": 0.5},
                            "warm_start": {"public": {"format": "digits-64"}}}, source="s.yaml")
    text = str(err.value)
    assert "unknown public set 'digits-64'; embedded: digits-28, digits-fonts-28" in text and "mnist" in text
    assert "\n" not in text


@pytest.mark.slow
def test_a_network_trained_on_digits_fonts_28_alone_recognises_real_mnist(mnist_dir):
    """The point of the set: a perceptual network trained on public data only (2 000 steps,
    no MNIST) classifies >= 85 % of the official MNIST test images (measured: 89 % on 1 000
    of them; 58 % for digits-28 under the earlier shift-and-shrink augmentation)."""
    x, y = digits_fonts_28()
    net = PerceptualFeatures(1, 28, 28, 10)
    train_on_public(net, torch.from_numpy(x), torch.from_numpy(y), steps=2000, batch_size=128, lr=1e-3, seed=0)
    mnist = read_mnist(mnist_dir)
    with torch.no_grad():
        accuracy = float((net(mnist.x[:2000].float()).argmax(1) == mnist.y[:2000]).float().mean())
    assert accuracy >= 0.85
