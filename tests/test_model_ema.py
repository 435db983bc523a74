"""model_ema: the update against a float64 reference, GM3D's teacher update unchanged bit for bit, the
engine (off = no change, checkpoint, SVM scores, every k steps, DDP), and ``source: ema`` downstream."""

from __future__ import annotations

import shutil
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from models.ema import ModelEMA, ModelEMAConfig, build_model_ema
from models.gm3d import PointMAEGM3D
from models.point_mae import PointMAE
from tests.conftest import REPO, run_cli
from tests.helpers import TINY_TC
from tools.engine.checkpoint import atomic_save
from tools.engine.builders import load_knowledge_teacher
from tools.tasks.pretrained import load_pretrained_encoder
from utils.errors import CheckpointError, ConfigError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))


@pytest.mark.parametrize("bn,warmup", [("average", False), ("copy", True)])
def test_update_matches_a_float64_reference(bn, warmup):
    net = _net()
    ema = ModelEMA(net, ModelEMAConfig(enabled=True, decay_start=0.9, decay_end=0.99, ramp_epochs=2,
                                       warmup=warmup, bn=bn))
    ref = {k: v.double().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    n = 0
    for epoch in range(3):
        ema.set_epoch(epoch)
        d_epoch = [0.9, 0.945, 0.99][epoch]
        for _ in range(2):
            net(torch.randn(8, 3)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            d = min(d_epoch, (1 + n) / (10 + n)) if warmup else d_epoch
            assert ema.current_decay() == pytest.approx(d)
            ema.update(net)
            n += 1
            for k, v in net.state_dict().items():
                buffer = k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")
                if not v.is_floating_point() or (buffer and bn == "copy"):
                    ref[k] = v.double().clone()
                else:
                    ref[k] = d * ref[k] + (1 - d) * v.double()
    got = ema.ema_state()
    assert ema.num_updates == 6
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(got["0.weight"], net.state_dict()["0.weight"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model_ema.decay_start = 1.5; expected a number in \[0, 1\]"):
        ModelEMAConfig.from_dict({"decay_start": 1.5})
    with pytest.raises(ConfigError, match="model_ema.every = 0; expected an integer >= 1"):
        ModelEMAConfig.from_dict({"every": 0})
    with pytest.raises(ConfigError, match="decay"):
        ModelEMAConfig.from_dict({"decayy": 0.9})
    assert build_model_ema({"enabled": False}, _net()) is None


# ------------------------------------------------------------------------------------ GM3D teacher
def _old_on_epoch_start(self, epoch, max_epoch):
    """GM3D's epoch hook as it was written before models/ema.py (the reference)."""
    g = self.gcfg
    self.masker.set_total_epochs(max_epoch)
    if epoch < g.ema_ramp_epochs:
        self.ema_decay = g.ema_decay_start + epoch / g.ema_ramp_epochs * (g.ema_decay_end - g.ema_decay_start)
    else:
        self.ema_decay = g.ema_decay_end
    self._stats, self._n_stats = {}, 0
    self._n_sel = self.masker.num_selected(epoch, self.student.num_group)


def _old_current_ema_decay(self):
    if not self.gcfg.ema_warmup:
        return self.ema_decay
    n = int(self.ema_num_updates)
    return min(self.ema_decay, (1.0 + n) / (10.0 + n))


@torch.no_grad()
def _old_after_step(self):
    """GM3D's EMA-teacher update as it was written before models/ema.py (the reference)."""
    decay = self.current_ema_decay()
    copy_bn = self.gcfg.ema_bn == "copy"
    lerp_t, lerp_s = [], []
    for (name, s), (_, e) in zip(self._student_tensors(), self.ema._student_tensors()):
        if not e.is_floating_point() or (copy_bn and name.endswith(("running_mean", "running_var"))):
            e.copy_(s)
        else:
            lerp_t.append(e)
            lerp_s.append(s.detach())
    torch._foreach_lerp_(lerp_t, lerp_s, 1.0 - decay)
    if self.gcfg.ema_warmup:
        self.ema_num_updates += 1


@pytest.fixture
def teacher_ckpt(tmp_path):
    torch.manual_seed(0)
    sd = {f"module.{k}": v for k, v in PointMAE(group_size=8, num_group=16, transformer_config=TINY_TC)
          .state_dict().items()}
    atomic_save({"base_model": sd, "epoch": 299}, tmp_path / "pretrain.pth")
    return str(tmp_path / "pretrain.pth")


def _gm3d(teacher, **g):
    torch.manual_seed(1)
    m = PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC, mask={"alpha_max": 0.5},
                     gm3d={"variant": "C", "gc_decoder_depth": 2, "teacher_ckpt": teacher, "ema_decay_start": 0.9,
                           "ema_decay_end": 0.99, "ema_ramp_epochs": 2, **g})
    load_knowledge_teacher(m.knowledge_teacher, teacher)
    return m


def _train(m, epochs=3, steps=2, model_ema=None):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(2)  # drop path draws from the global generator
    losses = []
    for epoch in range(epochs):
        m.on_epoch_start(epoch, epochs)
        if model_ema is not None:
            model_ema.set_epoch(epoch)
        for it in range(steps):
            g = torch.Generator().manual_seed(100 * epoch + it)
            out = m({"points": torch.randn(3, 128, 3, generator=g)}, epoch=epoch, generator=g)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            m.after_step()
            if model_ema is not None:
                model_ema.update(m)
            losses.append({k: v.detach().clone() for k, v in out.items()})
    return losses


@pytest.mark.parametrize("options", [{}, {"ema_bn": "copy", "ema_warmup": True}], ids=["paper", "options"])
def test_gm3d_teacher_update_is_bit_identical_to_the_previous_code(teacher_ckpt, options):
    new, old = _gm3d(teacher_ckpt, **options), _gm3d(teacher_ckpt, **options)
    old.on_epoch_start = types.MethodType(_old_on_epoch_start, old)
    old.current_ema_decay = types.MethodType(_old_current_ema_decay, old)
    old.after_step = types.MethodType(_old_after_step, old)
    a, b = _train(new), _train(old)
    assert len(a) == 6 and set(a[0]) == {"loss", "loss_point", "loss_gc", "loss_feat"}
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    sa, sb = new.state_dict(), old.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["ema.MAE_encoder.norm.weight"], sa["MAE_encoder.norm.weight"])


def test_model_ema_of_gm3d_equals_its_teacher_at_the_same_schedule(teacher_ckpt):
    """One rule for both averages: model_ema over a GM3D student, at the teacher's schedule and BatchNorm
    mode, holds exactly the teacher's copy of the student."""
    m = _gm3d(teacher_ckpt)
    ema = ModelEMA(m, ModelEMAConfig(enabled=True, decay_start=0.9, decay_end=0.99, ramp_epochs=2))
    _train(m, model_ema=ema)
    got, teacher = ema.ema_state(), m.ema.state_dict()
    assert set(got) == set(m.student.state_dict())
    for k, v in got.items():
        assert torch.equal(v, teacher[k]), k


# ------------------------------------------------------------------------------------ engine
def _metrics(run):
    import json
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_engine_off_changes_nothing_on_scores_beside_the_student(tiny_config, tmp_path):
    """With model_ema on, the student's run is the same bit for bit (no RNG draw, no other change); the
    average differs from the student, is saved, scored by the SVM every eval.svm_every epochs, logged to
    TensorBoard and printed in the final summary."""
    cfg = tiny_config(max_epoch=2, log={"progress_bar": False, "tensorboard": True})
    off, on = tmp_path / "off", tmp_path / "on"
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(off)])
    assert r.returncode == 0, r.stderr
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(on), "model_ema.enabled=true",
                 "model_ema.decay_start=0.5", "model_ema.every=2"])
    assert r.returncode == 0, r.stderr
    a, b = _metrics(off), _metrics(on)
    for x, y in zip(a, b):
        for k in x:
            if k != "time_s" and k != "samples_per_s":
                assert x[k] == y[k], k
    assert "ema_svm_acc" not in a[-1] and all("ema_svm_acc" in y and "ema_svm_C" in y for y in b[1:])
    assert "ema_svm_acc" not in b[0]  # epoch -1: the average is the initial model
    ca, cb = (torch.load(p / "ckpt-last.pth", weights_only=True) for p in (off, on))
    assert "model_ema" not in ca
    for k, v in ca["base_model"].items():
        assert torch.equal(v, cb["base_model"][k]), k
    # 32 shapes / batch 8 = 4 steps per epoch, 2 epochs, an update every 2nd step
    assert cb["model_ema_updates"] == 4 and set(cb["model_ema"]) == set(cb["base_model"])
    assert not torch.equal(cb["model_ema"]["MAE_encoder.norm.weight"], cb["base_model"]["MAE_encoder.norm.weight"])
    assert f"model_ema encoder, last epoch (1): {b[-1]['ema_svm_acc']:.2f} %" in r.stdout
    event_files = list((on / "tensorboard").glob("events.*"))
    assert event_files and b"ema_svm_acc" in b"".join(p.read_bytes() for p in event_files)


def test_resume_without_model_ema_weights_is_one_clear_error(tiny_config, tmp_path):
    cfg = tiny_config(max_epoch=2, eval={"svm_every": 0})
    run = tmp_path / "run"
    assert run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run),
                    "--stop_after_epoch", "0"]).returncode == 0
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run), "--resume",
                 "--accept-config-change", "model_ema.enabled=true"])
    assert r.returncode == 2
    assert "holds no model_ema weights (the run was started with model_ema off)" in r.stdout + r.stderr


DDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from tools.engine.builders import build_model_from_cfg, build_split
    from tools.engine.trainer import Trainer
    from utils import dist
    from utils.config import load_config

    cfg = load_config(sys.argv[1], [])
    rank, world = dist.init_distributed(torch.device("cpu"))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model_from_cfg(cfg), build_split(cfg, "train"), sys.argv[2])
    trainer.fit()
    torch.save({"ema": trainer.model_ema.ema_state(), "model": trainer.model.state_dict()},
               f"{sys.argv[2]}/rank{rank}.pt")
    dist.cleanup()
""")


def test_ddp_two_ranks_average_identically(tiny_config, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    cfg = tiny_config(max_epoch=1, eval={"svm_every": 0}, device="cpu",
                      model_ema={"enabled": True, "decay_start": 0.5, "bn": "average"})
    script = tmp_path / "ddp_ema.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "ddp"
    r = run_cli(["--standalone", "--nproc_per_node", "2", str(script), str(cfg), str(run)], prefix=[torchrun],
                timeout=300, env_extra={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = (torch.load(run / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    for k, v in r0["ema"].items():
        assert torch.equal(v, r1["ema"][k]), k
    # each rank's own BatchNorm statistics saw its own batches: the average would differ without the broadcast
    assert any(not torch.equal(v, r1["model"][k]) for k, v in r0["model"].items() if "running_" in k)
    assert not torch.equal(r0["ema"]["MAE_encoder.norm.weight"], r0["model"]["MAE_encoder.norm.weight"])


# ------------------------------------------------------------------------------------ downstream
def _pretrain_models():
    from models.point_m2ae import PointM2AE, PointM2AEGM3D
    from tests.test_point_m2ae import TINY
    tc = {**TINY_TC, "depth": 4}
    return {
        "point_mae": lambda: PointMAE(group_size=8, num_group=16, transformer_config=tc),
        "point_mae_gm3d": lambda: PointMAEGM3D(group_size=8, num_group=16, transformer_config=tc,
                                               gm3d={"variant": "A", "gc_decoder_depth": 1}),
        "point_m2ae": lambda: PointM2AE(**TINY),
        "point_m2ae_gm3d": lambda: PointM2AEGM3D(**TINY, gm3d={"variant": "A", "gc_decoder_depth": 1}),
    }


def _downstream_models(arch):
    if arch == "point_mae":
        from models.classifier import PointTransformer
        from models.point_mae_seg import PointMAESegmentation
        enc = dict(trans_dim=48, depth=4, num_heads=3, group_size=8, num_group=16)
        return [PointTransformer(**enc, encoder_dims=48, cls_dim=4),
                PointMAESegmentation(**enc, encoder_dims=48, fetch_layers=(1, 2, 3), fp_mlp=(64, 48),
                                     head_dims=(64, 32))]
    from models.point_m2ae_cls import PointM2AEModelNet40
    from models.point_m2ae_seg import PointM2AESegmentation
    from tests.test_point_m2ae_seg import ENC, SEG_TINY
    return [PointM2AEModelNet40(**ENC), PointM2AESegmentation(**ENC, **SEG_TINY)]


@pytest.mark.parametrize("name", ["point_mae", "point_mae_gm3d", "point_m2ae", "point_m2ae_gm3d"])
def test_source_ema_loads_the_average_into_every_downstream_model(tmp_path, name):
    torch.manual_seed(0)
    m = _pretrain_models()[name]()
    ema = ModelEMA(m, ModelEMAConfig(enabled=True, decay_start=0.5))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    ema.update(m)
    path = tmp_path / "ckpt.pth"
    atomic_save({"base_model": m.state_dict(), "model_ema": ema.ema_state(), "epoch": 0}, path)
    avg, student = ema.ema_state(), m.state_dict()
    prefix = "MAE_encoder." if m.ARCH == "point_mae" else ""
    for model in _downstream_models(m.ARCH):
        load_pretrained_encoder(model, path, source="ema")
        loaded = [k for k in model.state_dict() if prefix + k in avg and model.state_dict()[k].is_floating_point()]
        assert len(loaded) > 10
        for k in loaded:
            assert torch.equal(model.state_dict()[k], avg[prefix + k]), k
        assert sum(not torch.equal(model.state_dict()[k], student[prefix + k]) for k in loaded) > 10
        load_pretrained_encoder(model, path, source="student")
        for k in loaded:
            assert torch.equal(model.state_dict()[k], student[prefix + k]), k


def test_source_teacher_and_ema_on_a_gm3d_checkpoint_without_model_ema(tmp_path):
    """A GM3D checkpoint without model_ema: ``teacher`` (and ``ema``, as before) read its EMA teacher."""
    from models.classifier import PointTransformer
    torch.manual_seed(0)
    m = PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC,
                     gm3d={"variant": "A", "gc_decoder_depth": 1})
    with torch.no_grad():
        for p in m.ema.parameters():
            p.add_(1.0)
    atomic_save({"base_model": m.state_dict()}, tmp_path / "gm3d.pth")
    for source in ("teacher", "ema"):
        model = PointTransformer(trans_dim=48, depth=2, num_heads=3, encoder_dims=48, group_size=8, num_group=16,
                                 cls_dim=4)
        load_pretrained_encoder(model, tmp_path / "gm3d.pth", source=source)
        assert torch.equal(model.state_dict()["norm.weight"], m.state_dict()["ema.MAE_encoder.norm.weight"])


def test_source_ema_without_averaged_weights_is_one_clear_error(tmp_path):
    from models.classifier import PointTransformer
    torch.manual_seed(0)
    atomic_save({"base_model": PointMAE(group_size=8, num_group=16, transformer_config=TINY_TC).state_dict()},
                tmp_path / "plain.pth")
    model = PointTransformer(trans_dim=48, depth=2, num_heads=3, encoder_dims=48, group_size=8, num_group=16,
                             cls_dim=4)
    with pytest.raises(CheckpointError, match="source 'ema' needs averaged weights, but the checkpoint has no "
                                              "model_ema entry"):
        load_pretrained_encoder(model, tmp_path / "plain.pth", source="ema")
    with pytest.raises(CheckpointError, match="source 'teacher' but the checkpoint has no ema.MAE_encoder"):
        load_pretrained_encoder(model, tmp_path / "plain.pth", source="teacher")


def test_compare_masking_ema_arm_options(tmp_path):
    from tools.compare_masking import ema_overrides, main, train_seconds
    assert ema_overrides(20) == ["model_ema.enabled=true", "model_ema.decay_start=0.999",
                                 "model_ema.decay_end=0.9999", "model_ema.ramp_epochs=5", "model_ema.bn=average"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": -1}\n{"epoch": 0, "time_s": 1.5}\n{"epoch": 1, "time_s": 2.0}\n')
    assert train_seconds(run) == 3.5
    with pytest.raises(SystemExit):
        main(["--report", "--out", str(tmp_path), "--finetune-source", "random=decoder"])


@pytest.mark.slow
def test_cli_source_ema_for_finetune_fewshot_and_segmentation(tmp_path):
    """``--source ema`` through main_finetune.py (plain and --fewshot) and segmentation/main.py loads the
    model_ema weights; a checkpoint without averaged weights gives one line and exit 2."""
    torch.manual_seed(0)
    mae = PointMAE(group_size=8, num_group=16, transformer_config={**TINY_TC, "depth": 2})
    ema = ModelEMA(mae, ModelEMAConfig(enabled=True, decay_start=0.5))
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(torch.randn_like(p))
    ema.update(mae)
    atomic_save({"base_model": mae.state_dict(), "model_ema": ema.ema_state()}, tmp_path / "ema.pth")
    atomic_save({"base_model": mae.state_dict()}, tmp_path / "plain.pth")
    enc = ["model.trans_dim=48", "model.encoder_dims=48", "model.depth=2", "model.num_group=16",
           "model.group_size=8", "threads=1", "max_epoch=1", "scheduler.kwargs.epochs=1",
           "scheduler.kwargs.initial_epochs=0", "log.progress_bar=false", "log.tensorboard=false"]
    data = [f"dataset.{s}.{k}={v}" for s in ("train", "test") for k, v in
            (("num_classes", 3), ("samples_per_class", 4), ("test_per_class", 3), ("base_points", 128),
             ("npoints", 128))]
    ft = [*enc, *data, "npoints=128", "total_bs=4", "finetune.eval_bs=8"]
    r = run_cli(["main_finetune.py", "--config", "cfgs/finetune/quickstart_cls.yaml", "--finetune",
                 str(tmp_path / "ema.pth"), "--source", "ema", "--run_dir", str(tmp_path / "ft"),
                 "model.cls_dim=3", *ft])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "(source ema)" in (tmp_path / "ft" / "finetune.log").read_text()
    r = run_cli(["main_finetune.py", "--config", "cfgs/finetune/quickstart_cls.yaml", "--finetune",
                 str(tmp_path / "plain.pth"), "--source", "ema", "--run_dir", str(tmp_path / "f2"),
                 "model.cls_dim=3", *ft])
    err = [x for x in (r.stdout + r.stderr).splitlines() if "ERROR" in x]
    assert r.returncode == 2 and len(err) == 1 and "source 'ema' needs averaged weights" in err[0]
    r = run_cli(["main_finetune.py", "--config", "cfgs/finetune/quickstart_fewshot.yaml", "--fewshot", "--way",
                 "2", "--shot", "2", "--fold", "0", "--finetune", str(tmp_path / "ema.pth"), "--source", "ema",
                 "--run_dir", str(tmp_path / "fs"), *ft, "finetune.fewshot.query=1", "finetune.eval_every=1"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "(source ema)" in "".join(p.read_text() for p in (tmp_path / "fs").rglob("*.log"))
    seg = ["segmentation/main.py", "--config", "cfgs/segmentation/quickstart_seg.yaml", "--finetune",
           str(tmp_path / "ema.pth"), "--source", "ema", "--run_dir", str(tmp_path / "seg"), *enc,
           "model.fetch_layers=[0,1]", "model.fp_mlp=[32,32]", "model.head_dims=[32,16]", "npoints=64",
           "total_bs=4", "finetune.eval_bs=8", "dataset.train.samples_per_class=2", "dataset.test.test_per_class=1",
           "dataset.train.npoints=64", "dataset.test.npoints=64"]
    r = run_cli(seg)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "(source ema)" in (tmp_path / "seg" / "segment.log").read_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
