"""Load the vision half (InternViT + `mlp1`) of an InternVL3.5 checkpoint, in either on-disk format.

Only the shards holding vision tensors are opened and only those tensors are read; the language model's
weights never leave the disk.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from checkpoint.formats import VIR_PREFIXES, Format, detect_format, read_model_config
from vision_server.vision_model import VisionModel

# Module name -> checkpoint name, per format; "{i}" is a block index. A name given for a module (not
# a parameter) takes the parameter's ".weight"/".bias" suffix. The HF format splits the fused qkv into
# q_proj, k_proj and v_proj, which are concatenated (in that order) on load.
CHECKPOINT_NAMES: dict[Format, dict[str, str | tuple[str, ...]]] = {
    "custom": {
        "vit.embed.cls_token": "vision_model.embeddings.class_embedding",
        "vit.embed.pos_embed": "vision_model.embeddings.position_embedding",
        "vit.embed.proj": "vision_model.embeddings.patch_embedding",
        "vit.blocks.{i}.norm1": "vision_model.encoder.layers.{i}.norm1",
        "vit.blocks.{i}.attn.qkv": "vision_model.encoder.layers.{i}.attn.qkv",
        "vit.blocks.{i}.attn.q_norm": "vision_model.encoder.layers.{i}.attn.q_norm",
        "vit.blocks.{i}.attn.k_norm": "vision_model.encoder.layers.{i}.attn.k_norm",
        "vit.blocks.{i}.attn.proj": "vision_model.encoder.layers.{i}.attn.proj",
        "vit.blocks.{i}.ls1": "vision_model.encoder.layers.{i}.ls1",
        "vit.blocks.{i}.norm2": "vision_model.encoder.layers.{i}.norm2",
        "vit.blocks.{i}.mlp.fc1": "vision_model.encoder.layers.{i}.mlp.fc1",
        "vit.blocks.{i}.mlp.fc2": "vision_model.encoder.layers.{i}.mlp.fc2",
        "vit.blocks.{i}.ls2": "vision_model.encoder.layers.{i}.ls2",
        "projector.norm": "mlp1.0",
        "projector.fc1": "mlp1.1",
        "projector.fc2": "mlp1.3",
    },
    "hf": {
        "vit.embed.cls_token": "vision_tower.embeddings.cls_token",
        "vit.embed.pos_embed": "vision_tower.embeddings.position_embeddings",
        "vit.embed.proj": "vision_tower.embeddings.patch_embeddings.projection",
        "vit.blocks.{i}.norm1": "vision_tower.encoder.layer.{i}.layernorm_before",
        "vit.blocks.{i}.attn.qkv": (
            "vision_tower.encoder.layer.{i}.attention.q_proj",
            "vision_tower.encoder.layer.{i}.attention.k_proj",
            "vision_tower.encoder.layer.{i}.attention.v_proj",
        ),
        "vit.blocks.{i}.attn.q_norm": "vision_tower.encoder.layer.{i}.attention.q_norm",
        "vit.blocks.{i}.attn.k_norm": "vision_tower.encoder.layer.{i}.attention.k_norm",
        "vit.blocks.{i}.attn.proj": "vision_tower.encoder.layer.{i}.attention.projection_layer",
        "vit.blocks.{i}.ls1": "vision_tower.encoder.layer.{i}.lambda_1",
        "vit.blocks.{i}.norm2": "vision_tower.encoder.layer.{i}.layernorm_after",
        "vit.blocks.{i}.mlp.fc1": "vision_tower.encoder.layer.{i}.mlp.fc1",
        "vit.blocks.{i}.mlp.fc2": "vision_tower.encoder.layer.{i}.mlp.fc2",
        "vit.blocks.{i}.ls2": "vision_tower.encoder.layer.{i}.lambda_2",
        "projector.norm": "multi_modal_projector.layer_norm",
        "projector.fc1": "multi_modal_projector.linear_1",
        "projector.fc2": "multi_modal_projector.linear_2",
    },
}

# ViR (Flash checkpoints, custom format as published). The reference's ModuleLists count from 1.
VIR_NAMES: dict[str, str] = {
    "router_pooling.query_token": "pooling_before_gating.query_token",
    **{f"router_pooling.attn.{j}.{leaf}": f"pooling_before_gating.attn{j + 1}.{leaf}"
       for j in range(4) for leaf in ("in_proj_weight", "in_proj_bias", "out_proj")},
    **{f"router_pooling.norm.{j}": f"pooling_before_gating.norm{j + 1}" for j in range(4)},
    **{f"gating.blocks.{j}.{ours}": f"gating.block{j + 1}.{theirs}"
       for j in range(4) for ours, theirs in (("fc1", "0"), ("fc2", "3"), ("norm", "5"))},
    "gating.norm": "gating.gate.0",
    "gating.head": "gating.gate.1",
    "compressed_projector.norm": "mlp2.0",
    "compressed_projector.fc1": "mlp2.1",
    "compressed_projector.fc2": "mlp2.4",
    "compressed_projector.fc3": "mlp2.7",
}
CHECKPOINT_NAMES["custom"].update(VIR_NAMES)

# Checkpoint name prefixes of this model's tensors; ViR's are added for Flash checkpoints.
VISION_PREFIXES: dict[Format, tuple[str, ...]] = {
    "custom": ("vision_model.", "mlp1."),
    "hf": ("vision_tower.", "multi_modal_projector."),
}

# Published HF checkpoints nest everything but lm_head under "model."; save_pretrained in
# transformers 5.19 writes the vision tensors at the top level.
HF_PUBLISHED_ROOT = "model."


class VisionCheckpointError(ValueError):
    """A checkpoint's vision tensors are missing, unexpected, misshapen or unreadable."""


def checkpoint_names(module_name: str, fmt: Format, root: str = "") -> tuple[str, ...]:
    """The checkpoint tensor(s) one parameter of `VisionModel` is read from (several are concatenated)."""
    block = re.fullmatch(r"vit\.blocks\.(\d+)\.(.+)", module_name)
    template = f"vit.blocks.{{i}}.{block[2]}" if block else module_name
    table = CHECKPOINT_NAMES[fmt]
    owner, _, leaf = template.rpartition(".")
    if template in table:
        sources, suffix = table[template], ""
    elif leaf in ("weight", "bias") and owner in table:
        sources, suffix = table[owner], f".{leaf}"
    else:
        raise KeyError(f"no checkpoint name for module parameter {module_name!r}")
    sources = (sources,) if isinstance(sources, str) else sources
    index = block[1] if block else ""
    return tuple(root + source.format(i=index) + suffix for source in sources)


def _shard_map(path: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint -> the safetensors file holding it (reads headers only)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / shard for name, shard in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise VisionCheckpointError(f"{path}: neither model.safetensors.index.json nor model.safetensors found")


def _hf_root(names: set[str]) -> str:
    published = any(name.startswith(HF_PUBLISHED_ROOT + VISION_PREFIXES["hf"][0]) for name in names)
    saved = any(name.startswith(VISION_PREFIXES["hf"][0]) for name in names)
    if published and saved:
        raise VisionCheckpointError(
            "checkpoint holds vision tensors under both 'model.vision_tower.' and 'vision_tower.'"
        )
    return HF_PUBLISHED_ROOT if published else ""


def _read_tensors(shard_of: dict[str, Path], names: set[str]) -> dict[str, torch.Tensor]:
    by_shard: dict[Path, list[str]] = defaultdict(list)
    for name in sorted(names):
        by_shard[shard_of[name]].append(name)
    tensors = {}
    for shard, shard_names in by_shard.items():
        with safe_open(shard, framework="pt") as f:
            for name in shard_names:
                tensors[name] = f.get_tensor(name)
    return tensors


FINGERPRINT_SAMPLE_BYTES = 64 << 10


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes and shapes and of each one's first, middle and last 64 KiB.

    Sampled, not whole: hashing a 6B vision tower would add minutes to start-up on a host without fast
    SHA. Retraining or fine-tuning changes every element of the tensors it touches, so their samples.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        n, k = data.numel(), FINGERPRINT_SAMPLE_BYTES
        samples = [data] if n <= 3 * k else [data[:k], data[(n - k) // 2:(n + k) // 2], data[-k:]]
        for sample in samples:
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _fmt_list(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_vision_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VisionModel:
    """Build a `VisionModel` from a checkpoint directory, reading only its vision tensors, strictly."""
    path = Path(path)
    fmt = detect_format(path)
    config = read_model_config(path)
    shard_of = _shard_map(path)
    root = _hf_root(set(shard_of)) if fmt == "hf" else ""

    with torch.device("meta"):
        model = VisionModel(config)
    expected = model.state_dict()
    sources = {name: checkpoint_names(name, fmt, root) for name in expected}
    wanted = {source for names in sources.values() for source in names}
    if config.flash and fmt != "custom":
        raise VisionCheckpointError(f"{path}: Flash (ViR) checkpoints are read in the custom format only")
    prefixes = VISION_PREFIXES[fmt] + (VIR_PREFIXES if config.flash else ())
    present = {name for name in shard_of if name.startswith(tuple(root + p for p in prefixes))}
    if missing := sorted(wanted - shard_of.keys()):
        raise VisionCheckpointError(f"{path}: missing vision tensor(s) {_fmt_list(missing)}")
    if unexpected := sorted(present - wanted):
        raise VisionCheckpointError(f"{path}: unexpected vision tensor(s) {_fmt_list(unexpected)}")

    tensors = _read_tensors(shard_of, wanted)
    state = {}
    for name, names in sources.items():
        tensor = torch.cat([tensors[n] for n in names]) if len(names) > 1 else tensors[names[0]]
        if tensor.shape != expected[name].shape:
            raise VisionCheckpointError(
                f"{path}: vision tensor {' + '.join(names)} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)} for this config"
            )
        state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.checkpoint_tensors = tuple(sorted(wanted))
    model.weights_fingerprint = fingerprint(tensors)
    return model.eval().requires_grad_(False)
