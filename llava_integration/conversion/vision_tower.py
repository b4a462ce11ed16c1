"""The SigLIP tower of a LLaVA-NeXT checkpoint, whose architecture its config.json does not record.

LLaVA-NeXT builds the tower from `mm_vision_tower` (a hub name or a local directory), deletes its last encoder block
and replaces its pooling head by an identity; the checkpoint then holds the remaining blocks. The attention head count
cannot be read off the weights, so the tower's own config comes from a local directory or from `KNOWN_TOWERS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import SiglipVisionConfig

from manager_plugin.io import ConversionError

from .checkpoint_io import read_json

# Full (untruncated) towers by the last part of their name, as LLaVA-NeXT's training scripts name them.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "siglip-so400m-patch14-384": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}
HUB_NAMES = {"siglip-so400m-patch14-384": "google/siglip-so400m-patch14-384"}
ARCHITECTURE_FIELDS = tuple(KNOWN_TOWERS["siglip-so400m-patch14-384"])


def _read_tower_config(path: Path) -> dict[str, Any]:
    data = read_json(path / "config.json" if path.is_dir() else path)
    if data.get("model_type") == "siglip":  # a full SigLIP (text + vision) config
        data = data.get("vision_config") or {}
    missing = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads") if name not in data]
    if missing:
        raise ConversionError(f"{path} is not a SigLIP vision config: it lacks {missing}")
    return {name: data[name] for name in ARCHITECTURE_FIELDS if name in data}


def full_tower_config(mm_vision_tower: str | None, override: str | Path | None = None) -> dict[str, Any]:
    """The architecture of the full tower: from `override` (a directory or config.json), else from the tower name."""
    if override is not None:
        return _read_tower_config(Path(override).expanduser())
    if not mm_vision_tower:
        raise ConversionError("config.json has no mm_vision_tower: pass the tower's config with --vision-tower")
    local = Path(mm_vision_tower).expanduser()
    if (local / "config.json").is_file():
        return _read_tower_config(local)
    known = KNOWN_TOWERS.get(local.name)
    if known is None:
        raise ConversionError(
            f"cannot tell the architecture of vision tower {mm_vision_tower!r}: it is neither a local directory with a "
            f"config.json nor a known tower ({sorted(KNOWN_TOWERS)}); pass its config with --vision-tower DIR"
        )
    return dict(known)


def truncated_tower_config(full: dict[str, Any], kept_blocks: int) -> SiglipVisionConfig:
    """The HF config of the tower as the checkpoint holds it: the last block removed, no pooling head."""
    expected = full["num_hidden_layers"] - 1
    if kept_blocks != expected:
        raise ConversionError(
            f"the checkpoint holds {kept_blocks} vision encoder blocks, but LLaVA-NeXT keeps all but the last of the "
            f"tower's {full['num_hidden_layers']} blocks ({expected}): wrong --vision-tower or a truncated checkpoint?"
        )
    return SiglipVisionConfig(**{**full, "num_hidden_layers": kept_blocks}, vision_use_head=False)


def tower_name_for(vision_config: SiglipVisionConfig, override: str | None = None) -> str:
    """The `mm_vision_tower` to write for an HF tower: the hub name of the known tower it matches, or `override` once
    checked to fit (a local directory is written as an absolute path, a known tower as its hub name)."""
    full = {name: getattr(vision_config, name) for name in ARCHITECTURE_FIELDS}
    full["num_hidden_layers"] += 1  # LLaVA-NeXT builds the whole tower, then deletes its last block
    if override is None:
        for name, known in KNOWN_TOWERS.items():
            if all(full[field] == value for field, value in known.items()):
                return HUB_NAMES[name]
        raise ConversionError(
            f"the vision tower ({full}) matches no known tower ({sorted(KNOWN_TOWERS)}): pass --vision-tower DIR (a "
            "local SigLIP directory) for the mm_vision_tower field LLaVA-NeXT builds the tower from"
        )
    local = Path(override).expanduser()
    if local.exists():
        wanted = _read_tower_config(local)
        written = str((local if local.is_dir() else local.parent).resolve())
    elif local.name in KNOWN_TOWERS:
        wanted = KNOWN_TOWERS[local.name]
        written = override if "/" in override else HUB_NAMES[local.name]
    else:
        raise ConversionError(
            f"--vision-tower {override}: neither a local SigLIP directory nor a known tower ({sorted(KNOWN_TOWERS)}), "
            "so it cannot be checked against the model: pass the tower's local directory"
        )
    mismatched = [f"{field} {wanted[field]} (model: {full[field]})" for field in wanted if wanted[field] != full[field]]
    if mismatched:
        raise ConversionError(
            f"--vision-tower {override} does not fit the model's tower: {', '.join(mismatched)}; the model keeps all "
            "but the tower's last block"
        )
    return written
