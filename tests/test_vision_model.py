"""The vision model matches transformers' InternVL features from both formats, reading only vision tensors."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import transformers  # after language_server.torch_compat, which conftest imports first
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import language_server.torch_compat  # noqa: F401  (before transformers imports torchvision)
from checkpoint.generate import write_checkpoint
from vision_server import loader
from vision_server.loader import VISION_PREFIXES, VisionCheckpointError, load_vision_model
from vision_server.preprocess import normalize, preprocess, preprocess_tiles
from vision_server.vision_model import pixel_shuffle

IMAGE_SIZES = {"wide": (1500, 400), "tall": (300, 900), "small": (100, 80)}
MAX_TILES = 4  # keeps the CPU forward passes short; the grid rule itself is tested in test_preprocess
TINY_SHARD_BYTES = 2_000_000  # splits the tiny checkpoint so the vision tensors sit apart from most LLM ones


def assert_features_close(ours: torch.Tensor, reference: torch.Tensor, rel: float = 1e-5) -> None:
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    torch.testing.assert_close(ours, reference, rtol=0, atol=rel * reference.abs().max().item())


@pytest.fixture(scope="module")
def pixel_values() -> dict[str, torch.Tensor]:
    """A wide, a tall and a small image, PNG-encoded and run through our preprocessing."""
    return {name: preprocess(image_bytes(name), max_tiles=MAX_TILES) for name in IMAGE_SIZES}


def image_bytes(name: str) -> bytes:
    width, height = IMAGE_SIZES[name]
    rng = np.random.default_rng(width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# --- against a model built and saved by transformers itself ----------------------------------------

VARIANTS = {
    # InternViT-300M style: LayerNorm, qkv bias, last layer.
    "300m": {
        "vision": {"norm_type": "layer_norm", "attention_bias": True, "use_qk_norm": False},
        "select_layer": -1,
    },
    # InternViT-6B style: RMSNorm, qk-norm, no qkv bias; and an earlier feature layer.
    "6b": {
        "vision": {"norm_type": "rms_norm", "attention_bias": False, "use_qk_norm": True},
        "select_layer": -2,
    },
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def transformers_model(request, tmp_path_factory):
    """A random InternVLForConditionalGeneration and the directory its save_pretrained wrote."""
    variant = VARIANTS[request.param]
    config = transformers.InternVLConfig(
        vision_config={
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            **variant["vision"],
        },
        text_config={
            "model_type": "qwen3",
            "hidden_size": 96,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 48,
            "intermediate_size": 128,
            "vocab_size": 1000,
        },
        vision_feature_layer=variant["select_layer"],
    )
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init leaves CLS, positions and layer scales constant
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(f"transformers-{request.param}")
    model.save_pretrained(path)
    return model, path


def test_features_match_transformers_get_image_features(transformers_model, pixel_values):
    model, path = transformers_model
    ours = load_vision_model(path)
    for name, pixels in pixel_values.items():
        with torch.no_grad():
            # get_image_features returns the projected features in pooler_output: [tiles, 256, H].
            reference = model.model.get_image_features(pixel_values=pixels).pooler_output
        assert reference.shape == (pixels.shape[0], 256, 96), name
        assert_features_close(ours(pixels), reference)


def test_save_pretrained_spelling_is_read(transformers_model):
    _, path = transformers_model
    names = load_vision_model(path).checkpoint_tensors
    assert names and all(name.startswith(VISION_PREFIXES["hf"]) for name in names)


# --- the project's generated tiny checkpoints ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        fmt: write_checkpoint(root / fmt, "tiny", fmt, seed=0, max_shard_bytes=TINY_SHARD_BYTES)
        for fmt in ("hf", "custom")
    }


@pytest.fixture(scope="module")
def tiny_features(tiny_checkpoints, pixel_values):
    """Features of every test image from each format, loaded by our loader in float32."""
    models = {fmt: load_vision_model(path) for fmt, path in tiny_checkpoints.items()}
    return {fmt: {name: model(p) for name, p in pixel_values.items()} for fmt, model in models.items()}


def test_tiny_hf_checkpoint_matches_transformers_from_pretrained(
    tiny_checkpoints, tiny_features, pixel_values
):
    model = transformers.InternVLForConditionalGeneration.from_pretrained(
        tiny_checkpoints["hf"], dtype=torch.float32
    )
    model.eval()
    for name, pixels in pixel_values.items():
        with torch.no_grad():
            reference = model.model.get_image_features(pixel_values=pixels).pooler_output
        assert_features_close(tiny_features["hf"][name], reference)


def test_custom_and_hf_formats_give_the_same_features(tiny_features):
    for name in IMAGE_SIZES:
        assert torch.equal(tiny_features["custom"][name], tiny_features["hf"][name]), name


def test_features_have_one_row_per_token_per_tile(tiny_features, pixel_values):
    for name, pixels in pixel_values.items():
        assert tiny_features["hf"][name].shape == (pixels.shape[0], 256, 64)


def test_uint8_tiles_normalised_in_the_model_give_the_same_features(tiny_checkpoints, tiny_features, pixel_values):
    """The vision server hands the model uint8 tiles: it normalises them itself, bit for bit as the host did."""
    from vision_server.engine import VisionEngine

    model = load_vision_model(tiny_checkpoints["custom"])
    tiles = preprocess_tiles(image_bytes("small"), max_tiles=MAX_TILES)  # the fixture's image, [1, 448, 448, 3] u8
    assert tiles.dtype == torch.uint8 and torch.equal(normalize(tiles), pixel_values["small"])
    assert torch.equal(model(tiles), tiny_features["custom"]["small"])

    async def encode():
        engine = VisionEngine(model, device=torch.device("cpu"), dtype=torch.float32, feature_dtype=torch.float32)
        try:
            return await engine.encode("r", 0, tiles)
        finally:
            engine.close()

    import asyncio

    encoded = asyncio.run(encode())
    assert torch.equal(encoded.features, tiny_features["custom"]["small"].reshape(-1, 64))


def test_bfloat16_features_stay_close_to_float32(tiny_checkpoints, tiny_features, pixel_values):
    model = load_vision_model(tiny_checkpoints["custom"], dtype=torch.bfloat16)
    pixels = pixel_values["wide"]
    features = model(pixels)
    assert features.dtype == torch.bfloat16
    reference = tiny_features["custom"]["wide"]
    error = (features.float() - reference).norm() / reference.norm()
    assert error < 0.05


@pytest.mark.parametrize("fmt", ["hf", "custom"])
def test_loader_reads_only_vision_tensors(fmt, tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints[fmt]
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    root = "model." if fmt == "hf" else ""
    vision = {name for name in weight_map if name.startswith(tuple(root + p for p in VISION_PREFIXES[fmt]))}
    vision_shards = {weight_map[name] for name in vision}
    assert set(weight_map.values()) - vision_shards, "the test needs a shard without vision tensors"

    opened, read = [], []

    class RecordingSafeOpen:
        def __init__(self, filename, **kwargs):
            opened.append(filename.name)
            self.file = safe_open(filename, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", RecordingSafeOpen)
    model = load_vision_model(path)
    assert set(opened) == vision_shards
    assert sorted(read) == sorted(vision) == list(model.checkpoint_tensors)


def test_the_weights_fingerprint_changes_with_any_vision_weight_and_only_then(tiny_checkpoints, tmp_path):
    """The gateway's content keys include it: features cached for other weights must never be found."""
    first = load_vision_model(tiny_checkpoints["custom"]).weights_fingerprint
    assert len(first) == 64 and first == load_vision_model(tiny_checkpoints["custom"]).weights_fingerprint

    def nudge(tensors):
        tensors["vision_model.encoder.layers.1.mlp.fc2.bias"][0] += 1e-3

    rewrite_checkpoint(tiny_checkpoints["custom"], tmp_path / "nudged", nudge)
    assert load_vision_model(tmp_path / "nudged").weights_fingerprint != first

    def language_only(tensors):
        name = next(n for n in tensors if n.startswith("language_model."))
        tensors[name] = tensors[name] + 1

    rewrite_checkpoint(tiny_checkpoints["custom"], tmp_path / "language", language_only)
    assert load_vision_model(tmp_path / "language").weights_fingerprint == first


# --- strict loading --------------------------------------------------------------------------------


def rewrite_checkpoint(source, target, edit) -> None:
    """Copy a checkpoint's configs, and its tensors as one safetensors file after `edit(tensors)`."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, shard in weight_map.items():
        with safe_open(source / shard, framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


def test_missing_vision_tensor_is_named(tiny_checkpoints, tmp_path):
    rewrite_checkpoint(
        tiny_checkpoints["custom"],
        tmp_path / "ckpt",
        lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc2.bias"),
    )
    with pytest.raises(
        VisionCheckpointError, match=r"missing vision tensor\(s\) vision_model.encoder.layers.1.mlp.fc2.bias"
    ):
        load_vision_model(tmp_path / "ckpt")


def test_missing_split_qkv_tensor_is_named(tiny_checkpoints, tmp_path):
    name = "model.vision_tower.encoder.layer.0.attention.k_proj.weight"
    rewrite_checkpoint(tiny_checkpoints["hf"], tmp_path / "ckpt", lambda t: t.pop(name))
    with pytest.raises(VisionCheckpointError, match=f"missing vision tensor\\(s\\) {name}"):
        load_vision_model(tmp_path / "ckpt")


def test_unexpected_vision_tensor_is_named(tiny_checkpoints, tmp_path):
    def add_layer(tensors):
        tensors["vision_model.encoder.layers.2.ls1"] = torch.ones(64)

    rewrite_checkpoint(tiny_checkpoints["custom"], tmp_path / "ckpt", add_layer)
    with pytest.raises(
        VisionCheckpointError, match=r"unexpected vision tensor\(s\) vision_model.encoder.layers.2.ls1"
    ):
        load_vision_model(tmp_path / "ckpt")


def test_misshapen_vision_tensor_is_named(tiny_checkpoints, tmp_path):
    def truncate(tensors):
        tensors["mlp1.1.weight"] = tensors["mlp1.1.weight"][:, :-1].contiguous()

    rewrite_checkpoint(tiny_checkpoints["custom"], tmp_path / "ckpt", truncate)
    with pytest.raises(
        VisionCheckpointError, match=r"mlp1.1.weight has shape \(64, 255\), expected \(64, 256\)"
    ):
        load_vision_model(tmp_path / "ckpt")


# --- pixel shuffle ---------------------------------------------------------------------------------


def reference_pixel_shuffle(x, scale_factor):
    """InternVL's pixel_shuffle with ps_version v2, as written in the reference."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


@pytest.mark.parametrize("ratio, shape", [(0.5, (3, 16, 16, 32)), (0.25, (3, 8, 8, 128))])
def test_pixel_shuffle_matches_the_reference(ratio, shape):
    x = torch.randn(3, 32, 32, 8)
    out = pixel_shuffle(x, ratio)
    assert out.shape == shape
    assert torch.equal(out, reference_pixel_shuffle(x, ratio))


def test_pixel_shuffle_rejects_indivisible_grids():
    with pytest.raises(ValueError, match="31x31"):
        pixel_shuffle(torch.randn(1, 31, 31, 4), 0.5)
