"""The one augmentation recipe: every multi-crop implementation and the evaluation views read it."""
import io
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sere_scale.config.load import Config
from sere_scale.data.encoded import DeviceAugment
from sere_scale.data.fastcrop import FastMultiCrop
from sere_scale.data.gpu_multicrop import GPUMultiCrop
from sere_scale.data.multicrop import MultiCrop
from sere_scale.data.recipe import IMAGENET_MEAN, IMAGENET_STD, AugmentRecipe
from sere_scale.data.transform import SSLTransform, sample_seed, seed_sample
from sere_scale.eval.views import view_maker

ROOT = Path(__file__).resolve().parents[1]


def colour_image(W=120, H=90):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    arr[:, :, 0] = 230  # strongly coloured: grayscale is visible
    return Image.fromarray(arr)


def jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def pixels(crop: torch.Tensor) -> torch.Tensor:
    """Normalised (3, S, S) → 0..255 levels, with the ImageNet statistics written out independently."""
    m = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (crop.cpu() * s + m) * 255


def test_defaults_are_the_paper_recipe_of_method_md():
    r = AugmentRecipe()
    text = (ROOT / "docs" / "METHOD.md").read_text()
    aug = text[text.index("## Augmentations"):]
    assert "ratio 3/4–4/3" in aug and r.ratio == (0.75, 4 / 3)
    assert "flip p=0.5" in aug and r.flip_p == 0.5
    assert "colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8" in aug and r.jitter == (0.4, 0.4, 0.2, 0.1) and r.jitter_p == 0.8
    assert "grayscale p=0.2" in aug and r.gray_p == 0.2
    assert "sigma 0.1–2" in aug and r.blur_sigma == (0.1, 2.0)
    assert re.search(r"global 1 p=1\.0, global 2 p=0\.1, locals p=0\.5", aug)
    assert "solarize\nglobal 2 p=0.2" in aug or "solarize global 2 p=0.2" in aug.replace("\n", " ")
    # per-view probabilities: (blur, solarize); further globals alternate between the two global recipes
    assert [r.view_probs(v) for v in range(4)] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0), (0.5, 0.0)]
    r4 = AugmentRecipe(n_global=4, n_local=1)
    assert [r4.view_probs(v) for v in range(5)] == [(1.0, 0.0), (0.1, 0.2), (1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]
    assert r.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406) and r.std == IMAGENET_STD == (0.229, 0.224, 0.225)
    # torchvision's ColorJitter factor ranges
    assert r.jitter_ranges() == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))


def test_from_config_reads_the_data_keys():
    cfg = Config()
    d = cfg.data
    d.global_size, d.local_size, d.n_global, d.n_local = 40, 20, 3, 5
    d.global_scale, d.local_scale, d.photometric = (0.3, 0.9), (0.1, 0.2), False
    r = AugmentRecipe.from_config(cfg)
    assert (r.global_size, r.local_size, r.n_global, r.n_local) == (40, 20, 3, 5)
    assert r.global_scale == (0.3, 0.9) and r.local_scale == (0.1, 0.2) and r.photometric is False
    assert r.sizes() == [40] * 3 + [20] * 5 and r.scale(2) == (0.3, 0.9) and r.scale(3) == (0.1, 0.2)
    for impl in ("fast", "pil"):
        d.crop_impl = impl
        assert SSLTransform.from_config(cfg).multicrop.recipe == r
    assert DeviceAugment.from_config(cfg, "cpu").multicrop.recipe == r
    ev = view_maker(cfg, 24, "train").recipe
    assert (ev.global_size, ev.n_global, ev.n_local, ev.global_scale, ev.photometric) == (24, 2, 0, (0.3, 0.9), False)
    with pytest.raises(ValueError, match="n_global >= 1"):
        AugmentRecipe(n_global=0)


@pytest.mark.parametrize("impl", ["pil", "fast", "gpu"])
def test_every_implementation_follows_a_changed_recipe(impl):
    """Probabilities taken from the recipe, not from constants: with flip 1, jitter 0, grayscale 1, blur 0 and
    solarize 1 (threshold 0: every level inverted), every view is flipped and its pixels are 255 − grey."""
    r = AugmentRecipe(32, 16, 2, 2, flip_p=1.0, jitter_p=0.0, gray_p=1.0, blur_p=(0.0, 0.0, 0.0),
                      solarize_p=(1.0, 1.0, 1.0), solarize_threshold=0)
    img = colour_image()
    random.seed(0)
    torch.manual_seed(0)
    if impl == "pil":
        out = MultiCrop(recipe=r)(img)
    elif impl == "fast":
        out = FastMultiCrop(recipe=r)(Image.open(io.BytesIO(jpeg(img))))
    else:
        out = GPUMultiCrop(recipe=r)([torch.frombuffer(bytearray(jpeg(img)), dtype=torch.uint8)],
                                     torch.Generator().manual_seed(0))
        out = {"crops": [c[0] for c in out["crops"]], "flips": out["flips"][0]}
    assert bool(out["flips"].all())
    for c in out["crops"]:
        px = pixels(c)
        assert (px.max(0).values - px.min(0).values).max() < 1.5  # grey: the three channels equal
        # solarized grey of a red-dominated image: dark (the un-solarized grey is ~150 and above)
        assert px.mean() < 128


def test_one_seed_helper():
    assert sample_seed(3, 2, 5) == (3 * 1_000_003 + 2 * 7_919 + 5 * 104_729) % (2**63 - 1)
    assert sample_seed(3, 2, 5, rank=1) != sample_seed(3, 2, 5)
    seed_sample(3, 2, 5)
    a = random.random(), torch.rand(1)
    random.seed(sample_seed(3, 2, 5))
    torch.manual_seed(sample_seed(3, 2, 5))
    assert (random.random(), torch.rand(1)) == a
