import copy

import pytest
import torch

from models.gm3d import PointMAEGM3D
from models.losses import gc_ranking_loss, normalized_mse, spearman_per_row
from models.point_mae import PointMAE
from tests.helpers import TINY_TC, assert_ema_update
from tools.engine.checkpoint import CheckpointError, atomic_save
from tools.engine.builders import load_knowledge_teacher


def _mae():
    torch.manual_seed(0)
    return PointMAE(group_size=8, num_group=16, transformer_config=TINY_TC)


@pytest.fixture
def official_teacher_ckpt(tmp_path):
    """An official-layout checkpoint: {'base_model': {'module.' + key: ...}, ...}."""
    sd = {f"module.{k}": v for k, v in _mae().state_dict().items()}
    path = tmp_path / "pretrain.pth"
    atomic_save({"base_model": sd, "epoch": 299, "metrics": {"acc": 0.0}}, path)
    return str(path)


def gm3d(variant="C", teacher=None, alpha_max=0.5, **g):
    """A tiny GM3D model built as tools.engine.builders does: the model, then its teacher's weights from a file."""
    torch.manual_seed(1)
    cfg = {"variant": variant, "gc_decoder_depth": 2, "teacher_ckpt": teacher, **g}
    m = PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC, gm3d=cfg,
                     mask={"alpha_max": alpha_max})
    if m.knowledge_teacher is not None:
        load_knowledge_teacher(m.knowledge_teacher, teacher)
    return m


def batch(B=3, seed=0):
    return {"points": torch.randn(B, 128, 3, generator=torch.Generator().manual_seed(seed))}


def brute_ranking(pred, target, eps=1e-6):
    num, den = 0.0, 0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            for j in range(pred.shape[1]):
                if target[b, j] == target[b, i]:
                    continue
                s = torch.sigmoid(pred[b, j] - pred[b, i])
                num = num - (torch.log(s + eps) if target[b, j] > target[b, i] else torch.log(1 - s + eps))
                den += 1
    return num / max(den, 1)


def test_ranking_loss_equals_brute_force_and_grad_only_to_scores():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (3, 7), generator=g).double().requires_grad_(True)  # ties included
    loss = gc_ranking_loss(pred, target)
    ref = brute_ranking(pred.detach(), target.detach())
    torch.testing.assert_close(loss.detach(), torch.as_tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)  # float64 kept
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    gp = pred.detach().clone().requires_grad_(True)
    brute_ranking(gp, target.detach()).backward()
    torch.testing.assert_close(pred.grad.float(), gp.grad.float(), rtol=1e-4, atol=1e-6)


def test_ranking_loss_all_ties_is_zero_and_prefers_correct_order():
    assert gc_ranking_loss(torch.randn(2, 5), torch.ones(2, 5)).item() == 0.0
    t = torch.arange(6.0).view(1, 6)
    assert gc_ranking_loss(t * 3, t) < gc_ranking_loss(-t * 3, t)


def test_normalized_mse_and_spearman():
    a = torch.randn(4, 10, 8)
    torch.testing.assert_close(normalized_mse(a, 5 * a), torch.zeros(4, 10), atol=1e-6, rtol=0)
    cos = torch.nn.functional.cosine_similarity(a, -a, dim=-1)
    torch.testing.assert_close(normalized_mse(a, -a), 2 - 2 * cos)
    x = torch.randn(3, 9)
    torch.testing.assert_close(spearman_per_row(x, 2 * x + 1), torch.ones(3))
    torch.testing.assert_close(spearman_per_row(x, -x), -torch.ones(3))


def test_ema_update_matches_formula():
    m = gm3d("A")
    m.on_epoch_start(50, 400)
    assert m.ema_decay == pytest.approx(0.999 + 0.5 * (0.9999 - 0.999))
    m.on_epoch_start(150, 400)
    assert m.ema_decay == pytest.approx(0.9999)
    assert_ema_update(m)


def test_variant_c_every_student_param_gets_gradient_teachers_none(official_teacher_ckpt):
    m = gm3d("C", official_teacher_ckpt)
    m.train()
    m.on_epoch_start(0, 2)  # N_sel > 0 at epoch 0 of 2
    kt_before = copy.deepcopy(m.knowledge_teacher.state_dict())
    out = m(batch(), epoch=0, generator=torch.Generator().manual_seed(0))
    assert {"loss", "loss_point", "loss_feat", "loss_gc"} <= set(out)
    out["loss"].backward()
    for name, p in m.named_parameters():
        if name.startswith(("ema.", "knowledge_teacher.")):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0).step()
    m.after_step()
    for k, v in m.knowledge_teacher.state_dict().items():
        assert torch.equal(v, kt_before[k]), k


def test_variant_b_point_head_gets_no_gradient(official_teacher_ckpt):
    m = gm3d("B", official_teacher_ckpt, weight_warmup_epochs=15)
    m.on_epoch_start(0, 4)
    out = m(batch(), epoch=0, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert m.increase_dim[0].weight.grad is None
    assert m.MAE_decoder.blocks[0].mlp.fc1.weight.grad is not None
    assert m.loss_weights(0)[:2] == (1.0, 1.0) and m.loss_weights(15)[:2] == (1000.0, 13.889)


def test_variant_a_without_teacher_warns_and_has_no_kd(caplog):
    with caplog.at_level("WARNING"):
        m = gm3d("C", None)
    assert m.gcfg.variant == "A" and m.knowledge_teacher is None
    assert "knowledge distillation is OFF" in caplog.text
    m.on_epoch_start(0, 2)
    out = m(batch(), epoch=0, generator=torch.Generator().manual_seed(0))
    assert "loss_feat" not in out
    out["loss"].backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)


def test_official_checkpoint_loads_as_knowledge_teacher(official_teacher_ckpt):
    m = gm3d("C", official_teacher_ckpt)
    ref = _mae()
    for k, v in ref.MAE_encoder.state_dict().items():
        assert torch.equal(m.knowledge_teacher.MAE_encoder.state_dict()[k], v)


def test_wrong_teacher_checkpoint_names_mismatching_keys(tmp_path):
    bad = {k: v for k, v in _mae().state_dict().items() if not k.startswith("MAE_encoder.norm.")}
    bad["MAE_encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    atomic_save({"base_model": bad}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: MAE_encoder\.norm\.bias.*unexpected keys: MAE_encoder\.extra"):
        gm3d("C", str(path))


def test_teacher_top_scores_are_masked_and_metrics(official_teacher_ckpt):
    m = gm3d("C", official_teacher_ckpt, alpha_max=1.0)
    m.on_epoch_start(3, 4)  # alpha = 1: every masked patch is GC-selected
    p = m.group(batch()["points"])
    scores = m.teacher_scores(p)
    mask = m.masker(p.center, generator=torch.Generator().manual_seed(0), epoch=3, scores=scores)
    n_sel = m.masker.num_selected(3, 16)
    assert n_sel == 16 - int(16 * 0.4)
    assert mask.gather(1, scores.topk(n_sel, 1).indices).all()
    m(batch(), epoch=3, generator=torch.Generator().manual_seed(0))
    metrics = m.extra_metrics()
    assert metrics["n_sel"] == n_sel and -1.0 <= metrics["gc_rank_corr"] <= 1.0


def test_unloaded_knowledge_teacher_is_an_error_not_a_random_teacher(official_teacher_ckpt):
    torch.manual_seed(1)
    m = PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC,
                     gm3d={"variant": "C", "gc_decoder_depth": 2, "teacher_ckpt": official_teacher_ckpt})
    assert not m.knowledge_teacher.loaded
    with pytest.raises(CheckpointError, match="knowledge teacher has no weights"):
        m(batch(), epoch=0, generator=torch.Generator().manual_seed(0))
    m.load_state_dict(gm3d("C", official_teacher_ckpt).state_dict())  # a run checkpoint carries the teacher
    assert m.knowledge_teacher.loaded
    assert torch.isfinite(m(batch(), epoch=0, generator=torch.Generator().manual_seed(0))["loss"])


def test_gm3d_keys_are_the_students_plus_the_gc_branch_and_teachers(official_teacher_ckpt):
    m = gm3d("C", official_teacher_ckpt)
    keys = set(m.state_dict())
    student = set(_mae().state_dict())
    assert student <= keys
    rest = {k.split(".")[0] for k in keys - student}
    assert rest == {"mask_token_loss_pred", "MAE_decoder_loss_pred", "increase_dim_2", "ema", "knowledge_teacher"}
    assert {k[len("ema."):] for k in keys if k.startswith("ema.")} == {
        k for k in keys if not k.startswith(("ema.", "knowledge_teacher."))}


def test_gm3d_alpha_max_in_the_gm3d_block_names_its_new_home():
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"alpha_max moved to the mask block: write model.mask.alpha_max: 0.8"):
        PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC, gm3d={"alpha_max": 0.8})
    with pytest.raises(ConfigError, match="always masks with 'gm3d'"):
        PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC, mask={"strategy": "block"})
