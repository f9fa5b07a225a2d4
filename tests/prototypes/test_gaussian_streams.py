"""Table 5's noise control: every modality draws its own Gaussian noise, even with the same
options (the shipped overlay gives image and video the same ones)."""

from pathlib import Path

import torch
import yaml

from macsc.method.network import build_source
from macsc.prototypes.cache import cache_key, index_texts

OVERLAY = (
    Path(__file__).resolve().parents[2] / "lightning_configs/ablations/gaussian_prototypes.yaml"
)
TEXTS = ["a red apple", "the sea at night"]


def test_the_overlays_modalities_get_independent_noise():
    sources = yaml.safe_load(OVERLAY.read_text())["model"]["prototypes"]
    extractors = {name: build_source(name, spec) for name, spec in sources.items()}
    image, audio, video = (
        extractors[m].extract(TEXTS).features for m in ("image", "audio", "video")
    )
    assert sources["image"] == sources["video"]  # the same options ...
    assert not torch.equal(image, video)  # ... yet two noise streams
    # audio is not the image stream drawn longer (the first 512 values of each row differ)
    assert not torch.allclose(audio.flatten(1)[:, :512], image.flatten(1)[:, :512])
    # nor is any of them correlated with another: independent draws are nearly orthogonal
    for a, b in ((image, video), (image.flatten(1), audio.flatten(1)[:, : image[0].numel()])):
        cosine = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)
        assert cosine.abs().max() < 0.1
    digest = index_texts(TEXTS).digest
    keys = {cache_key(e, digest, "fp32", "float16") for e in extractors.values()}
    assert len(keys) == 3  # the cache cannot serve one modality from another's entry


def test_a_modalitys_noise_is_a_fixed_function_of_its_text():
    first = build_source("image", {"kind": "gaussian", "dim": 8, "k": 2}).extract(TEXTS)
    again = build_source("image", {"kind": "gaussian", "dim": 8, "k": 2}).extract(TEXTS[::-1])
    assert torch.equal(first.features, again.features.flip(0))
