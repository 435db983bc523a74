"""Time one full pre-training step (Point-MAE, GM3D) against an "official-formulation" baseline.

    python bench/pretrain_step.py [--device cpu|cuda] [--repeats N] [--warmup W]
                                  [--configs paper quickstart gm3d m2ae m2ae_gm3d] [--precisions fp32 bf16]
                                  [--threads T] [--quick] [--batches 32 128 256] [--modes eager compiled]
                                  [--compile-mode MODE]

Each row also reports samples/s, the projected wall-clock of the paper recipe (Point-MAE / Point-M2AE 300
epochs, GM3D 400, of 41,952 ShapeNet-55 shapes) and, on CUDA, the peak memory of its step.

One step is what the training engine does per iteration: the batch augmentation, the forward under
autocast (``tools.engine.trainer.autocast_context``), backward, gradient clipping when the config sets
``grad_norm_clip`` (GM3D), AdamW step, ``zero_grad`` and, for GM3D, the EMA-teacher update.

Rows, each at fp32 and at bf16 autocast (bf16 by default only where it is native: a GPU, or a CPU
with AVX512-BF16 / AMX; on an AVX2-only CPU a bf16 matmul is 5-10x slower than fp32, so those rows
are skipped with a one-line measurement unless ``--precisions fp32 bf16`` forces them):

* ``paper``: cfgs/pretrain/point_mae.yaml (64 groups x 32, trans_dim 384, depth 12, decoder 4) at
  batch 32 x 1024 points.
* ``quickstart``: cfgs/pretrain/quickstart.yaml at its own batch size and npoints.
* ``gm3d``: cfgs/pretrain/point_mae_gm3d.yaml (variant C, gc_decoder_depth 12), batch 32 x 1024, at
  epoch 200 of 400 so the teacher's scores choose part of the mask; the knowledge teacher is a
  randomly initialised Point-MAE saved to a temporary checkpoint.

Each project step is timed against a baseline measured in the same run, built from the project's
own modules but with the known costs of the official Point-MAE / GM3D code put back (see
:func:`officialize`): every patch embedded then the visible ones kept, Conv1d patch embedding on the
(B*G, C, K) layout, attention as explicit ``softmax(QK^T)V``, every decoder row computed then the
mask tokens kept, kNN as a per-sample Python loop,
per-sample numpy masks, a per-sample augmentation loop; for GM3D also the EMA teacher's unused
reconstruction decoder, the grouping computed a second time for the teacher, the GC head as Conv1d
then the channel mean, and the EMA update as a Python loop over the state dict (timm ``ModelEma``), and
torch's default AdamW (for-loop on CPU, foreach on CUDA) where the project uses the fused kernel. The
official CUDA kernels (FPS, Chamfer) have no CPU version; both sides use the project's ops for those.

All steps of a precision run round-robin within every repeat, so a busy shared machine slows every
row alike; still, on a shared 2-core CPU treat differences under ~1.2x as noise and re-run. On an
oversubscribed CPU (load above the core count) use ``--threads 1`` or set ``OMP_WAIT_POLICY=PASSIVE``:
with the default spinning OpenMP threads every parallel op waits for a descheduled sibling and
2-thread steps run 2-10x slower than 1-thread ones (see bench/README.md).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils import flop_counter

from datasets.transforms import ScaleAndTranslate, pc_norm
from extensions import Patches, fps, gather
from models import build_model
from models.gm3d import GCHead, PointMAEGM3D
from models.layers import Attention, PatchEmbed, TransformerDecoder
from models.point_mae import PointMAE
from tools.engine import checkpoint as ckpt_io
from tools.engine.trainer import autocast_context, compile_forward, hooks_of
from tools.engine.optim import build_optimizer
from tools.engine.builders import load_knowledge_teacher
from utils.config import load_config
from utils.misc import native_bf16

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = {
    "paper": "cfgs/pretrain/point_mae.yaml",
    "quickstart": "cfgs/pretrain/quickstart.yaml",
    "gm3d": "cfgs/pretrain/point_mae_gm3d.yaml",
    "m2ae": "cfgs/pretrain/point_m2ae.yaml",            # project rows only: no official formulation here
    "m2ae_gm3d": "cfgs/pretrain/point_m2ae_gm3d.yaml",
}
PAPER_CONFIGS = ("paper", "gm3d", "m2ae", "m2ae_gm3d")
GM3D_CONFIGS = ("gm3d", "m2ae_gm3d")
PAPER_BATCH = 32          # the batch the official timings in issues 2 and 3 were taken at
GM3D_EPOCH, GM3D_EPOCHS = 200, 400
SHAPENET55_TRAIN = 41_952  # shapes per epoch of the paper recipes
RECIPE_EPOCHS = {"paper": 300, "gm3d": 400, "m2ae": 300, "m2ae_gm3d": 400}  # Point-MAE / GM3D / Point-M2AE


# ---------------------------------------------------------------------------------------------
# The official formulation, rebuilt from the project's modules
# ---------------------------------------------------------------------------------------------
class OfficialPatchEmbed(PatchEmbed):
    """Mini-PointNet as the official ``Encoder`` runs it: Conv1d on (B*G, C, K), max, concat."""

    def forward(self, point_groups: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, G, K, _ = point_groups.shape
        x = point_groups.reshape(B * G, K, 3).transpose(2, 1)
        f = self.first_conv(x)                                          # (BG, 256, K)
        f_global = torch.max(f, dim=2, keepdim=True)[0]
        f = torch.cat([f_global.expand(-1, -1, K), f], dim=1)           # (BG, 512, K)
        f = self.second_conv(f)
        tokens = torch.max(f, dim=2, keepdim=False)[0].reshape(B, G, self.encoder_channel)
        return tokens if keep is None else tokens[keep].view(B, -1, self.encoder_channel)  # then select


class OfficialGCHead(GCHead):
    """``increase_dim_2`` as the official GM3D code runs it: Conv1d on (B, C, G), then the channel mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.transpose(1, 2)).mean(1)


class OfficialAttention(Attention):
    """timm-0.4 attention: explicit ``softmax(q k^T * scale) v``."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, n_query: int = 0) -> torch.Tensor:
        assert n_query == 0, "the official decoder computes every row"
        B, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (C // h) ** -0.5
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class OfficialDecoder(TransformerDecoder):
    """Every block on every token, then the last ``return_token_num`` rows are kept."""

    def forward(self, x: torch.Tensor, pos: torch.Tensor, return_token_num: int = 0) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return self.head(self.norm(x[:, -return_token_num:] if return_token_num else x))


def official_group(xyz: torch.Tensor, num_group: int, group_size: int) -> Patches:
    """FPS centres, then kNN one sample at a time (KNN_CUDA's batch loop), flat batch-offset indexing."""
    B, N, _ = xyz.shape
    center = gather(xyz, fps(xyz, num_group))
    with torch.no_grad():
        idx = torch.stack([torch.cdist(center[b].float(), xyz[b].float())
                           .topk(group_size, dim=-1, largest=False, sorted=True)[1] for b in range(B)])
    flat = (idx + torch.arange(B, device=xyz.device).view(-1, 1, 1) * N).view(-1)
    neighborhood = xyz.reshape(B * N, -1)[flat, :].view(B, num_group, group_size, 3).contiguous()
    return Patches(neighborhood - center.unsqueeze(2), center, idx)


class NumpyRandomMask:
    """Point-MAE ``_mask_center_rand``: a {0,1} vector shuffled by numpy, one sample at a time."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def __call__(self, center, *, generator=None, epoch=0, scores=None):
        B, G, _ = center.shape
        num_mask = int(self.ratio * G)
        overall = np.zeros([B, G])
        for i in range(B):
            m = np.hstack([np.zeros(G - num_mask), np.ones(num_mask)])
            np.random.shuffle(m)
            overall[i, :] = m
        return torch.from_numpy(overall).to(torch.bool).to(center.device)


class NumpyGM3DMask:
    """HPM/GM3D ``generate_mask``: top-N_sel teacher scores masked, the rest shuffled by numpy per sample."""

    def __init__(self, project_mask):
        self.inner = project_mask  # for num_masked / num_selected / set_total_epochs

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, center, *, generator=None, epoch=0, scores=None):
        B, G, _ = center.shape
        M = self.inner.num_masked(G)
        n_sel = self.inner.num_selected(epoch, G)
        order = np.argsort(-scores.detach().float().cpu().numpy(), axis=1)
        overall = np.zeros([B, G])
        for i in range(B):
            rest = order[i, n_sel:].copy()
            np.random.shuffle(rest)
            overall[i, order[i, :n_sel]] = 1
            overall[i, rest[:M - n_sel]] = 1
        return torch.from_numpy(overall).to(torch.bool).to(center.device)


class OfficialPointMAE(PointMAE):
    """Point-MAE with the official per-sample kNN loop."""

    def group(self, points: torch.Tensor) -> Patches:
        return official_group(points, self.num_group, self.group_size)


class OfficialGM3D(PointMAEGM3D):
    """GM3D with the official path's waste: regrouping for the teacher, its unused reconstruction
    decoder, and the EMA update as a Python loop over the state dict (its student groups with the
    official per-sample kNN loop, :class:`OfficialPointMAE`)."""

    def forward(self, batch, *, epoch=0, generator=None):
        self._batch_points = batch["points"] if isinstance(batch, dict) else batch
        return super().forward(batch, epoch=epoch, generator=generator)

    @torch.no_grad()
    def teacher_scores(self, groups):
        t = self.ema
        p = official_group(self._batch_points, self.student.num_group, self.student.group_size)  # second grouping
        x_all = t.MAE_encoder(p.neighborhood, p.center)
        rec = t.MAE_decoder(x_all, t.decoder_pos_embed(p.center))             # nobody reads this
        t.increase_dim(rec.transpose(1, 2))
        return t.gc_scores_all(x_all, p).float()

    @torch.no_grad()
    def after_step(self) -> None:
        d = self.ema_decay
        student = dict(self._student_tensors())
        for name, e in self.ema._student_tensors():
            e.copy_(e * d + (1.0 - d) * student[name].detach())


def embed_all(model: nn.Module) -> nn.Module:
    """The official semantics for a project model: every patch embedded (``embed_visible_only: false``),
    so the patch embedding's BatchNorm statistics cover all patches, as in the official code."""
    for m in model.modules():
        if hasattr(m, "embed_visible_only"):
            m.embed_visible_only = False
    return model


def officialize(model: nn.Module) -> nn.Module:
    """Turn a project model into the official formulation in place (same parameters and keys)."""
    for m in model.modules():
        if type(m) is PatchEmbed:
            m.__class__ = OfficialPatchEmbed
        elif type(m) is Attention:
            m.__class__ = OfficialAttention
        elif type(m) is TransformerDecoder:
            m.__class__ = OfficialDecoder
        elif type(m) is GCHead:
            m.__class__ = OfficialGCHead
    embed_all(model)
    if isinstance(model, PointMAEGM3D):
        model.__class__ = OfficialGM3D
        model.student.__class__ = OfficialPointMAE
        model.ema.student.__class__ = OfficialPointMAE
        model.masker = NumpyGM3DMask(model.masker)
    elif isinstance(model, PointMAE):
        model.__class__ = OfficialPointMAE
        model.masker = NumpyRandomMask(model.tc.mask_ratio)
    return model


def official_scale_translate(pc: torch.Tensor, generator=None) -> torch.Tensor:
    """``PointcloudScaleAndTranslate``: numpy draws and an in-place update, one sample at a time."""
    for i in range(pc.shape[0]):
        s = np.random.uniform(low=2.0 / 3.0, high=3.0 / 2.0, size=[3])
        t = np.random.uniform(low=-0.2, high=0.2, size=[3])
        pc[i, :, 0:3] = torch.mul(pc[i, :, 0:3], torch.from_numpy(s).float().to(pc.device)) \
            + torch.from_numpy(t).float().to(pc.device)
    return pc


# ---------------------------------------------------------------------------------------------
# Steps and timing
# ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One engine iteration of ``model`` on a fixed batch; ``__call__`` returns the loss."""

    def __init__(self, model: nn.Module, cfg, points: torch.Tensor, precision: str, device: torch.device,
                 augment: Callable, epoch: int = 0, optimizer_impl: str = "auto", compiled: bool = False,
                 compile_mode: str | None = None):
        self.model = model.to(device).train()
        self.forward = compile_forward(self.model, {"enabled": compiled, "backend": "inductor",
                                                    "mode": compile_mode if compiled else None})
        self.warmup_s = 0.0
        opt_cfg = dict(cfg["optimizer"])
        opt_cfg["kwargs"] = dict(opt_cfg.get("kwargs", {}), implementation=optimizer_impl)
        self.opt = build_optimizer(self.model, opt_cfg)
        self.clip = cfg.get("grad_norm_clip")
        self.points, self.precision, self.device, self.augment, self.epoch = \
            points, precision, device, augment, epoch
        self.gen = torch.Generator().manual_seed(0)
        hooks_of(self.model).on_epoch_start(epoch, GM3D_EPOCHS)
        self.peak = 0  # bytes: the row's weights, buffers, optimizer state + its step's largest transient

    def __call__(self, sync: bool = True) -> float:
        """One step; ``sync=False`` reads nothing back (no loss check, no synchronize, no peak)."""
        model, opt = self.model, self.opt
        cuda = self.device.type == "cuda" and sync
        if cuda:
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        pts = self.augment(self.points.clone(), self.gen)
        with autocast_context(self.device, self.precision):
            out = self.forward({"points": pts}, epoch=self.epoch, generator=self.gen)
        loss = out["loss"]
        value = loss.item() if sync else 0.0
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value}")
        loss.backward()
        if self.clip:
            nn.utils.clip_grad_norm_(model.parameters(), float(self.clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        hooks_of(model).after_step()
        if sync:
            synchronize(self.device)
        if cuda:  # other rows stay allocated: count this row's own tensors, plus the step's growth
            transient = torch.cuda.max_memory_allocated(self.device) - start
            self.peak = max(self.peak, self.resident_bytes() + transient)
        return value

    def resident_bytes(self) -> int:
        """Bytes of the weights, buffers and optimizer state this row keeps between steps."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return sum(t.nbytes for t in tensors if t.device.type == "cuda")


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that
# scaled_dot_product_attention dispatches to on CPU; without these two the attention would count zero.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them: matmuls,
    convolutions and attention, forward and backward (elementwise ops, norms and reductions are not
    counted, as in the usual model-FLOPs convention)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(step: Step) -> int:
    """FLOPs of one training step of ``step`` (its compiled forward, if any, counted through the eager
    module: the same arithmetic, which the counter cannot see inside a compiled graph)."""
    forward, step.forward = step.forward, step.model
    try:
        return count_flops(step)
    finally:
        step.forward = forward


PEAK_SHAPES = {"2048^3": (2048, 2048, 2048), "2048x384x1152": (2048, 384, 1152)}  # square; transformer qkv


class MatmulPeak:
    """One ``m x k @ k x n`` matmul in the row's compute dtype, timed round-robin with the rows so that
    the load of a shared machine weighs on the peak as on the steps. Its rate is the machine's own
    matmul peak for that precision, threads and moment."""

    def __init__(self, shape: tuple[int, int, int], precision: str, device: torch.device):
        m, k, n = shape
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(m, k, generator=g).to(device, dtype)
        self.b = torch.randn(k, n, generator=g).to(device, dtype)
        self.flops = 4 * 2 * m * k * n
        self.device, self.peak, self.warmup_s = device, 0, 0.0

    def __call__(self, sync: bool = True) -> float:
        for _ in range(4):  # a few back to back, so one call is not dominated by timer and launch overhead
            torch.mm(self.a, self.b)
        synchronize(self.device)
        return 0.0


def time_steps(steps: dict, warmup: int, repeats: int, pipelined: bool = False) -> dict:
    """Warm every step up, then time them round-robin ``repeats`` times; seconds per step.

    Round-robin (not one row after another) so that a shared machine's load, which drifts over
    minutes, weighs on every row alike, including the GM3D / Point-MAE ratio. A row whose warm-up raises
    (e.g. a compiler failure) is dropped with a note on stderr; each step's ``warmup_s`` holds its warm-up
    time (for compiled rows, mostly the compilation). ``pipelined`` adds, per row, a block of ``repeats``
    steps with no host read between them (key + ``("pipelined",)``, one mean time).
    """
    for key in list(steps):
        t0 = time.perf_counter()
        try:
            for _ in range(warmup):
                steps[key]()
        except Exception as e:  # noqa: BLE001 - report the row and keep the others
            print(f"  !! row {key} failed in warm-up: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            del steps[key]
            continue
        steps[key].warmup_s = time.perf_counter() - t0
    times: dict = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    for key in [k for k in steps if pipelined and k[1] == "ours"]:
        # The engine's regime (log.sync_every > 1): `repeats` steps queued back to back, one read at the end.
        step = steps[key]
        synchronize(step.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step(sync=False)
        synchronize(step.device)
        times[key + ("pipelined",)] = [(time.perf_counter() - t0) / repeats]
    return times


def linear_probe(device: torch.device) -> str:
    """One encoder-sized Linear (832x384 -> 1536) forward in fp32 and under bf16 autocast, in ms."""
    x = torch.randn(832, 384, device=device)
    lin = nn.Linear(384, 1536).to(device)
    out = []
    for precision in ("fp32", "bf16"):
        ts = []
        with torch.no_grad(), autocast_context(device, precision):
            for _ in range(4):
                t0 = time.perf_counter()
                lin(x)
                synchronize(device)
                ts.append(time.perf_counter() - t0)
        out.append(f"{precision} {statistics.median(ts[1:]) * 1e3:.1f} ms")
    return ", ".join(out)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} logical cores"


def model_cfg(name: str):
    return load_config(REPO / CONFIG_FILES[name])


def make_points(batch: int, npoints: int, device: torch.device) -> torch.Tensor:
    """Seeded clouds normalised into the unit sphere like the data pipeline (anisotropic Gaussians)."""
    g = torch.Generator().manual_seed(1234)
    pts = torch.randn(batch, npoints, 3, generator=g) * torch.tensor([1.0, 0.6, 0.3])
    return torch.stack([pc_norm(p) for p in pts]).to(device)


def build(name: str, cfg, teacher_ckpt: str | None) -> nn.Module:
    m = dict(cfg["model"])
    if name in GM3D_CONFIGS:
        m["gm3d"] = dict(m["gm3d"], teacher_ckpt=teacher_ckpt)
    model = build_model(m)
    if getattr(model, "knowledge_teacher", None) is not None:
        load_knowledge_teacher(model.knowledge_teacher, teacher_ckpt)
    return model


def write_teacher(cfg, path: str) -> None:
    """A randomly initialised backbone of the same shape saved as the knowledge-teacher checkpoint."""
    m = {k: v for k, v in dict(cfg["model"]).items() if k not in ("gm3d", "mask")}
    m["NAME"] = m["NAME"].replace("_GM3D", "")
    if "transformer_config" in m:
        m["transformer_config"] = dict(m["transformer_config"], mask_type="rand")
    torch.manual_seed(0)
    ckpt_io.atomic_save({"base_model": build_model(m).state_dict()}, path)


def fmt_gflop(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 5; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    ap.add_argument("--configs", nargs="+", default=["paper", "quickstart", "gm3d"], choices=list(CONFIG_FILES))
    ap.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32 and bf16 where bf16 is native (GPU, AVX512-BF16/AMX CPU), else fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = torch default)")
    ap.add_argument("--batch", type=int, default=None, help="override the batch of every config")
    ap.add_argument("--no-baseline", action="store_true", help="time the project steps only")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes, each a separate round-robin group (e.g. 32 128 256; default: --batch "
                         "or each config's); the official baseline runs at batch 32 only")
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
                    help="eager and/or torch.compile (inductor) of the training forward (default: eager)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of compiled rows (default: inductor's; e.g. reduce-overhead)")
    ap.add_argument("--pipelined", action="store_true",
                    help="also time each project row as a block of --repeats steps with no host read between "
                         "them (the engine with log.sync_every > 1); the official rows read the loss every step")
    ap.add_argument("--official-semantics", action="store_true",
                    help="project rows embed every patch too (embed_visible_only: false), as the baseline")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 8, 1 warm-up + 2 timed steps")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    batch_override = args.batch or (8 if args.quick else None)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)

    precisions = args.precisions
    skipped_bf16 = None
    if precisions is None:
        precisions = ["fp32", "bf16"]
        if not native_bf16(device):
            precisions = ["fp32"]
            skipped_bf16 = linear_probe(device)
    batches = args.batches or [batch_override]
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    omp = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; " if device.type == "cpu" else ""
    # The table is printed group by group (flushed), so a run cut short by a time limit keeps its rows.
    print(f"Machine: {machine(device)}; torch {torch.__version__}; {omp}{warmup} warm-up + {repeats} timed "
          f"steps per row, the rows of a (precision, batch) group round-robin; 1-min load average "
          f"{load0[0]:.1f} at start."
          + (" Project rows: official semantics (embed_visible_only: false)." if args.official_semantics else ""))
    if skipped_bf16:
        print(f"bf16 rows skipped: this CPU has no native bf16 matmul (oneDNN reports none; one "
              f"832x384->1536 Linear: {skipped_bf16}). Force them with --precisions fp32 bf16.")
    print(f"Projected: epochs x {SHAPENET55_TRAIN:,} ShapeNet-55 train shapes / samples per s (steps only: "
          f"data loading keeping up, no evaluation); Point-MAE and Point-M2AE 300 epochs, GM3D 400."
          + (" Peak GiB: the row's weights, buffers and optimizer state plus its step's largest transient "
             "(torch.cuda.max_memory_allocated)." if device.type == "cuda" else ""))
    print()
    header = True
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = {name: model_cfg(name) for name in args.configs}
        teachers = {name: os.path.join(tmp, f"teacher_{name}.pth") for name in cfgs if name in GM3D_CONFIGS}
        for name, path in teachers.items():
            write_teacher(cfgs[name], path)
        for precision in precisions:
            for batch_size in batches:
                rows = time_group(args, cfgs, teachers, precision, batch_size, device, warmup, repeats)
                table = format_table(rows, threads if device.type == "cpu" else "GPU", device.type == "cuda")
                lines = table.split("\n")[0 if header else 2:]
                if lines:
                    print("\n".join(lines), flush=True)
                header = False
                for r in rows:
                    if r["mode"] == "compiled":
                        print(f"  (compiled {r['config']} {precision} batch {r['batch']}: {warmup} warm-up "
                              f"steps incl. compilation took {r['warmup_s']:.0f} s)", file=sys.stderr,
                              flush=True)
    total = time.perf_counter() - t_start
    print(f"\nTotal {total:.0f} s; 1-min load average {os.getloadavg()[0]:.1f} at end.")
    return 0


LABELS = {"paper": "Point-MAE", "quickstart": "Point-MAE", "gm3d": "GM3D (C, GC dec 12)",
          "m2ae": "Point-M2AE", "m2ae_gm3d": "Point-M2AE + GM3D (C)"}


def time_group(args, cfgs, teachers, precision: str, batch_size: int | None, device, warmup: int,
               repeats: int) -> list[dict]:
    """Build the steps of one (precision, batch) group, time them round-robin and return their rows."""
    steps: dict = {}
    shapes: dict = {}
    for name, cfg in cfgs.items():
        batch = batch_size or (PAPER_BATCH if name in PAPER_CONFIGS else int(cfg["total_bs"]))
        teacher = teachers.get(name)
        npoints = int(cfg["npoints"])
        shapes[name] = (batch, npoints)
        points = make_points(batch, npoints, device)
        epoch = GM3D_EPOCH if name in GM3D_CONFIGS else 0
        for mode in args.modes:
            torch.manual_seed(0)
            ours = build(name, cfg, teacher)
            if args.official_semantics:
                embed_all(ours)
            steps[(name, "ours", mode)] = Step(ours, cfg, points, precision, device,
                                               ScaleAndTranslate(), epoch, compiled=mode == "compiled",
                                               compile_mode=args.compile_mode)
        baseline_batch = not args.batches or batch == PAPER_BATCH  # one batch per row, or the paper's
        if not args.no_baseline and not name.startswith("m2ae") and baseline_batch:
            torch.manual_seed(0)
            steps[(name, "official", "eager")] = Step(officialize(build(name, cfg, teacher)), cfg, points,
                                                      precision, device, official_scale_translate, epoch,
                                                      optimizer_impl="default")
    flops = {key: step_flops(step) for key, step in steps.items()}  # one extra, untimed step per row
    for label, shape in PEAK_SHAPES.items():
        steps[("peak", label, "eager")] = MatmulPeak(shape, precision, device)
    t0 = time.perf_counter()
    times = time_steps(steps, warmup, repeats, pipelined=args.pipelined)
    peak_gflops = {key[1]: steps[key].flops / statistics.median(times.pop(key)) / 1e9
                   for key in [k for k in times if k[0] == "peak"]}
    peak = max(peak_gflops.values())
    peaks = {k: step.peak for k, step in steps.items()}
    warm = {k: step.warmup_s for k, step in steps.items()}
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for key, ts in times.items():
        name, impl, mode = key[:3]
        if len(key) > 3:  # the pipelined block of this row
            mode = f"{mode}, no per-step read"
        base = med.get((name, "official", "eager"))
        batch, npoints = shapes[name]
        plain = med.get(("m2ae" if name.startswith("m2ae") else "paper", impl, mode))
        sps = batch / med[key]
        achieved = flops[key[:3]] / med[key] / 1e9
        rows.append({"gflop": flops[key[:3]] / 1e9, "gflops_per_s": achieved, "peak_gflops": peak,
                     "peak_by_shape": peak_gflops, "share": achieved / peak,
                     "config": name, "impl": impl, "mode": mode, "precision": precision, "batch": batch,
                     "npoints": npoints, "median": med[key], "min": min(ts), "max": max(ts),
                     "peak": peaks[key[:3]], "samples_per_s": sps, "warmup_s": warm[key[:3]],
                     "speedup": base / med[key] if base else None,
                     "ratio": med[key] / plain if name in GM3D_CONFIGS and plain and len(key) == 3 else None,
                     "projected_h": RECIPE_EPOCHS[name] * SHAPENET55_TRAIN / sps / 3600
                     if name in RECIPE_EPOCHS else None})
    print(f"  .. {precision} matmul peak, in the same round-robin: "
          + ", ".join(f"{label} {v:,.0f} GFLOP/s" for label, v in peak_gflops.items()),
          file=sys.stderr, flush=True)
    print(f"  .. {precision}, batch {batch_size or 'default'} ({time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{'/'.join(k)} {fmt_ms(v)} ms" for k, v in med.items()),
          file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict], threads, cuda: bool) -> str:
    """The markdown table of ``rows`` (fp32 first, then by config, batch, project before official)."""
    order = {"paper": 0, "gm3d": 1, "m2ae": 2, "m2ae_gm3d": 3, "quickstart": 4}
    rows = sorted(rows, key=lambda r: (r["precision"] != "fp32", order[r["config"]], r["batch"],
                                       r["impl"] != "ours", r["mode"] != "eager"))
    out = ["| config | step | precision | mode | threads | batch x points | median ms | min-max ms "
           "| samples/s "
           + ("| peak GiB " if cuda else "")
           + "| GFLOP / step | GFLOP/s | share of matmul peak (peak GFLOP/s) "
           + "| speed-up vs official | GM3D / its backbone | projected paper recipe |",
           "|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|---|---|---|---|---|"]
    for r in rows:
        impl = "project" if r["impl"] == "ours" else "official formulation"
        speed = f"**{r['speedup']:.2f}x**" if r["impl"] == "ours" and r["speedup"] else \
            ("1.00x" if r["impl"] == "official" else "")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        prec = "bf16 autocast" if r["precision"] == "bf16" else "fp32"
        proj = f"{r['projected_h']:,.1f} h ({RECIPE_EPOCHS[r['config']]} ep)" if r["projected_h"] else ""
        peak = f"| {r['peak'] / 2**30:.2f} " if cuda else ""
        out.append(f"| {r['config']} | {LABELS[r['config']]}, {impl} | {prec} | {r['mode']} | {threads} "
                   f"| {r['batch']} x {r['npoints']} | {fmt_ms(r['median'])} "
                   f"| {fmt_ms(r['min'])}-{fmt_ms(r['max'])} "
                   f"| {r['samples_per_s']:.1f} {peak}| {fmt_gflop(r['gflop'])} | {fmt_gflop(r['gflops_per_s'])} "
                   f"| {100 * r['share']:.0f} % ({r['peak_gflops']:,.0f}) "
                   f"| {speed} | {ratio} | {proj} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
