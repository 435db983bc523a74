"""Small shared test utilities."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

TINY_TC = {"mask_ratio": 0.6, "mask_type": "rand", "trans_dim": 48, "encoder_dims": 48, "depth": 2,
           "drop_path_rate": 0.1, "num_heads": 3, "decoder_depth": 1, "decoder_num_heads": 3}


def child_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child process that runs a script of this checkout: ``base`` (default
    ``os.environ``) with this repository's root first on ``PYTHONPATH``, so the child imports this tree's
    code whatever is installed and wherever it runs; ``extra`` is added last."""
    env = dict(os.environ if base is None else base)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *rest])
    env.update(extra)
    return env


def official_point_mae_keys(depth: int = 12, decoder_depth: int = 4) -> set[str]:
    """The official ``Point_MAE`` pre-training state_dict keys (docs/METHOD.md, section 7.1), by hand."""
    keys = {"mask_token", "MAE_encoder.norm.weight", "MAE_encoder.norm.bias",
            "MAE_decoder.norm.weight", "MAE_decoder.norm.bias", "increase_dim.0.weight", "increase_dim.0.bias"}
    for conv in ("first_conv", "second_conv"):
        for i in (0, 3):
            keys |= {f"MAE_encoder.encoder.{conv}.{i}.weight", f"MAE_encoder.encoder.{conv}.{i}.bias"}
        keys |= {f"MAE_encoder.encoder.{conv}.1.{n}"
                 for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for pe in ("MAE_encoder.pos_embed", "decoder_pos_embed"):
        keys |= {f"{pe}.{i}.{n}" for i in (0, 2) for n in ("weight", "bias")}
    block = ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias"]
    keys |= {f"MAE_encoder.blocks.blocks.{i}.{b}" for i in range(depth) for b in block}
    keys |= {f"MAE_decoder.blocks.{i}.{b}" for i in range(decoder_depth) for b in block}
    return keys


def assert_ema_update(m) -> None:
    """After perturbing the student of GM3D model ``m``, one ``after_step`` at decay 0.9 moves every float
    tensor of its EMA teacher to ``0.9 * teacher + 0.1 * student`` and copies the integer ones."""
    m.ema_decay = 0.9
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in m.ema.state_dict().items()}
    student = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("ema.")}
    m.after_step()
    after = m.ema.state_dict()
    for k, v in before.items():
        if v.is_floating_point():
            torch.testing.assert_close(after[k], 0.9 * v + 0.1 * student[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after[k], student[k])
