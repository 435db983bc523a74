"""The worked example of docs/ARCHITECTURE.md: a new backbone is one model file, one adapter, one config.

``ToyMAE`` below is a complete backbone in about thirty lines (a linear patch embedding and one
transformer block). Registered like any model, it runs, with no change anywhere else, through the real
entry points: pre-training with the linear-SVM evaluator, GM3D (EMA teacher, GC ranking, curriculum,
knowledge distillation from the toy's own pre-training checkpoint) and fine-tuning from it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from extensions import chamfer_l2, group
from models import MODELS
from models.adapters import ADAPTERS, CheckpointAdapter
from models.base import Classifier, EncoderTeacher, MaskedAutoencoder
from models.gm3d import GM3D
from models.layers import Block, TransformerDecoder
from models.masking import build_mask, resolve_mask_config
from tests.conftest import TINY_DATA

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- the backbone (one file)
class ToyEncoder(nn.Module):
    def __init__(self, group_size: int, dim: int):
        super().__init__()
        self.embed, self.pos, self.block = nn.Linear(3 * group_size, dim), nn.Linear(3, dim), Block(dim, 2)

    def forward(self, p, mask=None):
        x = self.embed(p.neighborhood.flatten(2)) + self.pos(p.center)
        return self.block(x if mask is None else x[~mask].view(x.shape[0], -1, x.shape[-1]))


class ToyMAE(MaskedAutoencoder):
    ARCH = "toy"

    def __init__(self, num_group: int = 16, group_size: int = 8, dim: int = 16, mask: dict | None = None):
        super().__init__()
        self.num_group, self.group_size, self.token_dim = num_group, group_size, dim
        self.encoder, self.dec_pos = ToyEncoder(group_size, dim), nn.Linear(3, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder, self.head = TransformerDecoder(dim, 1, 2, 0.0), nn.Linear(dim, 3 * group_size)
        self.masker = build_mask(resolve_mask_config(mask, None))

    def group(self, points):
        return group(points, self.num_group, self.group_size)

    def mask_centers(self, p):
        return p.center

    def encode(self, p, mask=None):
        return self.encoder(p, mask)

    def mask_scale_tokens(self, encoded):
        return encoded

    def decoder_positions(self, p, mask=None):
        B = p.center.shape[0]
        c = p.center if mask is None else torch.cat([p.center[~mask].view(B, -1, 3), p.center[mask].view(B, -1, 3)], 1)
        return self.dec_pos(c)

    def reconstruct_masked(self, p, mask, encoded):
        B, M = mask.shape[0], int(mask[0].sum())
        x = torch.cat([encoded, self.mask_token.expand(B, M, -1)], 1)
        f_hat = self.decoder(x, self.decoder_positions(p, mask), M)
        pred = self.head(f_hat).view(B * M, self.group_size, 3)
        return f_hat, chamfer_l2(pred, p.neighborhood[mask].view(B * M, -1, 3), reduction="none").view(B, M)

    def extract_features(self, points):
        t = self.encode(self.group(points))
        return t.mean(1) + t.amax(1)

    def decoder_spec(self):
        return {"num_heads": 2, "drop_path_rate": 0.0}

    def build_knowledge_teacher(self, teacher_model=None):
        return ToyTeacher(self.group_size, self.token_dim)

    def forward(self, batch, *, epoch=0, generator=None):
        p = self.group(batch["points"])
        mask = self.masker(p.center, generator=generator, epoch=epoch)
        loss = self.reconstruct_masked(p, mask, self.encode(p, mask))[1].mean()
        return {"loss": loss, "chamfer_l2": loss.detach()}


class ToyTeacher(EncoderTeacher):
    ARCH = "toy"

    def __init__(self, group_size: int, dim: int):
        super().__init__()
        self.encoder, self.token_dim = ToyEncoder(group_size, dim), dim
        self.freeze()

    def encode_full(self, p):
        return self.encoder(p)


class ToyGM3D(GM3D):
    ARCH = "toy"

    def __init__(self, num_group: int = 16, group_size: int = 8, dim: int = 16, mask: dict | None = None,
                 gm3d: dict | None = None, knowledge_teacher: EncoderTeacher | None = None):
        student_mask = {k: v for k, v in (mask or {}).items() if k in ("ratio", "count")}
        super().__init__(ToyMAE(num_group, group_size, dim, student_mask), mask=mask, gm3d=gm3d,
                         knowledge_teacher=knowledge_teacher)


class ToyClassifier(Classifier):
    ARCH = "toy"

    def __init__(self, cls_dim: int = 3, num_group: int = 16, group_size: int = 8, dim: int = 16):
        super().__init__()
        self.cls_dim, self.num_group, self.group_size = cls_dim, num_group, group_size
        self.encoder, self.cls_head = ToyEncoder(group_size, dim), nn.Linear(dim, cls_dim)

    def extract_features(self, points):
        t = self.encoder(group(points, self.num_group, self.group_size))
        return t.mean(1) + t.amax(1)

    def logits(self, points):
        return self.cls_head(self.extract_features(points))

    def loss_acc(self, logits, label):
        label = label.reshape(-1).long()
        return F.cross_entropy(logits.float(), label), ((logits.argmax(-1) == label).float().mean() * 100).detach()

    def forward(self, batch, *, epoch=0, generator=None):
        if isinstance(batch, torch.Tensor):
            return self.logits(batch)
        loss, acc = self.loss_acc(self.logits(batch["points"]), batch["label"])
        return {"loss": loss, "acc": acc}


# ----------------------------------------------------------------------------- the adapter
class ToyAdapter(CheckpointAdapter):
    arch, display, ENCODER = "toy", "toy", ("encoder.",)

    def recognises(self, keys):
        return any(k.startswith(("encoder.embed.", "ema.encoder.embed.")) for k in keys)

    def is_pretraining(self, state):
        return "mask_token" in state

    def encoder_weights(self, ckpt, *, source="student", where="<checkpoint>"):
        sd, prefix = self.state(ckpt, where), ("ema." if source == "ema" else "")
        enc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix + "encoder.")}
        return enc, {"layout": f"toy ({prefix}encoder.*)", "dropped": {}, "n_encoder": len(enc), "extra": {}}

    def teacher_state(self, ckpt, *, where="<checkpoint>"):
        return self.encoder_weights(ckpt, where=where)[0]


@pytest.fixture(scope="module")
def registered():
    """The one registration per piece (undone after the module, so the registry test does not see it)."""
    names = {"ToyMAE": ToyMAE, "ToyGM3D": ToyGM3D, "ToyClassifier": ToyClassifier}
    for name, cls in names.items():
        MODELS.register(name)(cls)
    ADAPTERS.register("toy")(ToyAdapter)
    yield
    for name in names:
        MODELS._items.pop(name)
    ADAPTERS._items.pop("toy")


def write(path, cfg):
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


COMMON = {"npoints": 128, "total_bs": 8, "max_epoch": 2, "threads": 1, "log": {"progress_bar": False,
          "tensorboard": False}, "scheduler": {"kwargs": {"epochs": 2, "initial_epochs": 1}}}


def test_toy_backbone_pretrains_runs_gm3d_svm_and_finetunes(registered, tmp_path):
    from tools.tasks.finetune import run_finetune
    from tools.tasks.pretrain import run_pretrain

    data = {"train": {**TINY_DATA, "subset": "train"}, "svm_train": {**TINY_DATA, "subset": "train"},
            "svm_test": {**TINY_DATA, "subset": "test"}}
    pre = write(tmp_path / "toy.yaml", {"model": {"NAME": "ToyMAE"}, "dataset": data, **COMMON,
                                        "eval": {"svm_every": 1, "at_start": True}})
    s = run_pretrain(pre, [], run_dir=str(tmp_path / "toy"))
    assert s["init"]["init/svm_acc"] >= 0 and s["last_value"] is not None   # the SVM evaluator ran on the toy
    rows = [json.loads(x) for x in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/loss"] < rows[1]["train/loss"]

    teacher = str(tmp_path / "toy" / "ckpt-last.pth")
    gm = write(tmp_path / "toy_gm3d.yaml", {"_base_": pre, "model": {
        "NAME": "ToyGM3D", "mask": {"alpha_max": 1.0}, "gm3d": {"variant": "C", "gc_decoder_depth": 1,
                                                                 "teacher_ckpt": teacher}}})
    g = run_pretrain(gm, [], run_dir=str(tmp_path / "toy_gm3d"))
    last = g["last"]
    assert last["train/n_sel"] > 0 and "train/loss_feat" in last and "train/gc_rank_corr" in last
    ckpt = torch.load(tmp_path / "toy_gm3d" / "ckpt-last.pth", weights_only=True)["base_model"]
    kt = torch.load(teacher, weights_only=True)["base_model"]
    torch.testing.assert_close(ckpt["knowledge_teacher.encoder.embed.weight"], kt["encoder.embed.weight"])

    ft = write(tmp_path / "toy_cls.yaml", {
        "model": {"NAME": "ToyClassifier", "cls_dim": 4}, "eval": {"best_metric": "test_acc"},
        "dataset": {"train": {**TINY_DATA, "subset": "train"}, "test": {**TINY_DATA, "subset": "test"}},
        **COMMON, "finetune": {"eval_bs": 8}})
    f = run_finetune(ft, [], run_dir=str(tmp_path / "toy_ft"), ckpt=str(tmp_path / "toy_gm3d" / "ckpt-last.pth"))
    assert f["last"]["test_acc"] >= 0
    assert set(f["left_at_init"]) == {"cls_head.weight", "cls_head.bias"}   # the toy adapter's exact new keys
