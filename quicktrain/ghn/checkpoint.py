"""GHN checkpoints: one dict of plain types and tensors, written atomically, read with ``weights_only=True``.

Layout::

    {"format": "quicktrain.ghn/1", "config": GHNConfig dict, "dataset": DatasetInfo dict,
     "state_dict": GHN weights, "train": {step, optimizer, scheduler, rng, args} or {}, "command": str}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .model import GHN, DatasetInfo, GHNConfig

FORMAT = "quicktrain.ghn/2"  # /2: tiled conv decoder, shape bins, classifier predictor (issue 13)
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def save_checkpoint(
    path: str | Path,
    ghn: GHN,
    *,
    train_state: dict[str, Any] | None = None,
    command: str = "",
) -> None:
    """Save ``ghn`` (its config, dataset and weights) to ``path`` atomically (temp file, ``os.replace``)."""
    if ghn.dataset is None:
        raise ValueError(
            "this GHN has no DatasetInfo; build it with GHN(config, dataset=DatasetInfo(...)) to save it"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": ghn.config.to_dict(),
        "dataset": ghn.dataset.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ghn.state_dict().items()},
        "train": train_state or {},
        "command": command,
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict; a missing, corrupt or foreign file raises a clear error."""
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(str(p) for p in shipped_checkpoints().values()) or "none"
        raise FileNotFoundError(
            f"GHN checkpoint {str(path)!r} does not exist; train one with `quicktrain ghn train --dataset D "
            f"--out {path}` or use a shipped one ({shipped})"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; all mean the same to the user
        raise ValueError(
            f"GHN checkpoint {str(path)!r} is corrupt or not a torch file ({e}); re-create it"
        ) from e
    if isinstance(payload, dict) and str(payload.get("format", "")).startswith("quicktrain.ghn/"):
        if payload["format"] != FORMAT:
            raise ValueError(
                f"{str(path)!r} is a GHN checkpoint of an older quicktrain ({payload['format']!r}, this one reads "
                f"{FORMAT!r}); its weights do not fit this GHN, re-train it with `quicktrain ghn train`"
            )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{str(path)!r} is not a quicktrain GHN checkpoint (format {fmt!r}, expected {FORMAT!r})"
        )
    return payload


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> GHN:
    """Load a GHN (in eval mode) with its config and :class:`DatasetInfo`."""
    payload = read_checkpoint(path)
    ghn = GHN(GHNConfig.from_dict(payload["config"]), DatasetInfo.from_dict(payload["dataset"]))
    ghn.load_state_dict(payload["state_dict"])
    return ghn.to(map_location).eval()


def shipped_checkpoints() -> dict[str, Path]:
    """``{dataset name: path}`` of the GHNs shipped in ``quicktrain/assets`` (``ghn-<dataset>.pt``)."""
    return {p.stem.removeprefix("ghn-"): p for p in sorted(ASSETS.glob("ghn-*.pt"))}


__all__ = ["FORMAT", "load_checkpoint", "read_checkpoint", "save_checkpoint", "shipped_checkpoints"]
