"""Per-step time of every masking arm, interleaved round-robin in one process (A/B in one run)."""
import sys, time, statistics, torch, platform
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "/work/wt/m13")
torch.set_num_threads(1)
from utils.config import load_config
from tools.builders import build_model_from_cfg
sys.argv = sys.argv[:1]
COMMON = ["total_bs=4", "model.mask.count=gm3d"]
G = ["model.NAME=Point_MAE_GM3D", "model.transformer_config.mask_type=gm3d", "model.gm3d.gc_decoder_depth=2",
     "model.gm3d.variant=C"]
OPT = ["model.gm3d.ema_bn=copy", "model.gm3d.ema_warmup=true", "model.gm3d.gc_target=zscore",
       "model.gm3d.gc_chamfer_norm=true"]
arms = {"random": [], "block": ["model.transformer_config.mask_type=block"], "gm3d_paper": G,
        "gm3d_opts": G + OPT + ["model.gm3d.gc_scorer=content"], "gm3d_position": G + OPT + ["model.gm3d.gc_scorer=position"],
        "gm3d_oracle": G + OPT + ["model.gm3d.gc_scorer=oracle"]}
models = {}
for a, o in arms.items():
    torch.manual_seed(0)
    m = build_model_from_cfg(load_config("cfgs/pretrain/quickstart.yaml", COMMON + o), load_teacher=False)
    kt = getattr(m, "knowledge_teacher", None)
    if kt is not None: kt.loaded = True
    m.train(); m.on_epoch_start(15, 20)
    models[a] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-3))
x = torch.randn(4, 512, 3)
times = {a: [] for a in arms}
for r in range(12):
    for a, (m, opt) in models.items():
        t0 = time.perf_counter()
        out = m({"points": x}, epoch=15); out["loss"].backward(); opt.step(); opt.zero_grad(); m.after_step()
        if r >= 2: times[a].append(time.perf_counter() - t0)
base = statistics.median(times["random"])
print(f"{platform.processor() or platform.machine()}, 1 thread, fp32, batch 4 x 512, epoch 15 of 20 (GM3D selects part of the mask)")
print("| arm | s/step (median of 10) | x random |\n|---|---|---|")
for a, t in times.items():
    print(f"| {a} | {statistics.median(t):.3f} | {statistics.median(t)/base:.2f} |")
