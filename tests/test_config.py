"""Tests for utils/config.py: _base_ inheritance, overrides, validation, provenance, save/load, pickling."""

from __future__ import annotations

import copy
import pickle
import textwrap
from pathlib import Path

import pytest
import yaml

from utils.config import COMMAND_LINE, DEFAULTS_PATH, Config, load_config, parse_override, save_config
from utils.errors import ConfigError
from utils.registry import Registry

DEFAULTS = """
optimizer:
  type: AdamW
  kwargs:
    lr: 0.001
    weight_decay: 0.05
    betas: [0.9, 0.999]
scheduler: {type: CosLR, kwargs: {epochs: 300, initial_epochs: 10}}
max_epoch: 300
deterministic: false
best_metric: svm_acc
resume: null
milestones: [30, 60]
tags: []
model:
  NAME: PointMAE
  num_group: 64
  group_size: 32
  transformer_config: {mask_ratio: 0.6, mask_type: rand}
dataset:
  train: {}
gm3d:
  lambda_feat: 13.889
  teacher_model: null
"""


def write(root: Path, rel: str, text: str) -> Path:
    """Write dedented ``text`` to ``root / rel`` and return the path."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake repo root (also the working directory) holding the fixture defaults file."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "cfgs/_base_/default.yaml", DEFAULTS)
    return tmp_path


def load(repo: Path, rel: str, overrides: tuple[str, ...] = (), **kwargs) -> Config:
    kwargs.setdefault("defaults", repo / "cfgs/_base_/default.yaml")
    return load_config(repo / rel, overrides, **kwargs)


# ------------------------------------------------------------------ inheritance


def test_defaults_are_the_base_of_every_config(repo: Path) -> None:
    write(repo, "cfgs/x.yaml", "max_epoch: 10\n")
    cfg = load(repo, "cfgs/x.yaml")
    assert cfg.max_epoch == 10
    assert cfg.optimizer.kwargs.lr == 0.001
    assert list(cfg) == list(yaml.safe_load(DEFAULTS))


def test_three_level_chain_nested_override_keeps_siblings(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", """
        max_epoch: 100
        optimizer: {kwargs: {lr: 0.01, weight_decay: 0.1}}
        model: {num_group: 128, transformer_config: {mask_ratio: 0.7}}
    """)
    write(repo, "cfgs/sub/b.yaml", """
        _base_: ../a.yaml
        max_epoch: 200
        optimizer: {kwargs: {weight_decay: 0.2}}
    """)
    write(repo, "cfgs/sub/deeper/c.yaml", """
        _base_: ../b.yaml
        model: {transformer_config: {mask_type: block}}
    """)
    cfg = load(repo, "cfgs/sub/deeper/c.yaml")
    assert cfg.max_epoch == 200
    assert cfg.optimizer.to_dict() == {
        "type": "AdamW", "kwargs": {"lr": 0.01, "weight_decay": 0.2, "betas": [0.9, 0.999]}}
    assert cfg.model.num_group == 128
    assert cfg.model.group_size == 32
    assert cfg.model.transformer_config.to_dict() == {"mask_ratio": 0.7, "mask_type": "block"}
    assert cfg.source_of("max_epoch") == "cfgs/sub/b.yaml"
    assert cfg.source_of("optimizer.kwargs.lr") == "cfgs/a.yaml"
    assert cfg.source_of("model.transformer_config.mask_type") == "cfgs/sub/deeper/c.yaml"
    assert cfg.source_of("model.group_size") == "cfgs/_base_/default.yaml"


def test_lists_are_replaced_not_merged(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "milestones: [1, 2, 3]\n")
    write(repo, "cfgs/b.yaml", "_base_: a.yaml\nmilestones: [7]\n")
    assert load(repo, "cfgs/a.yaml").milestones == [1, 2, 3]
    assert load(repo, "cfgs/b.yaml").milestones == [7]


def test_list_of_bases_later_wins_includer_wins_over_all(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "max_epoch: 1\nmodel: {num_group: 1}\n")
    write(repo, "cfgs/b.yaml", "max_epoch: 2\n")
    write(repo, "cfgs/c.yaml", "_base_: [a.yaml, b.yaml]\nmodel: {group_size: 3}\n")
    cfg = load(repo, "cfgs/c.yaml")
    assert (cfg.max_epoch, cfg.model.num_group, cfg.model.group_size) == (2, 1, 3)
    assert cfg.source_of("max_epoch") == "cfgs/b.yaml"


def test_nested_base_official_dataset_style_relative_to_repo_root(repo: Path) -> None:
    write(repo, "cfgs/dataset_configs/ShapeNet-55.yaml", """
        NAME: ShapeNet
        DATA_PATH: data/ShapeNet55-34/ShapeNet-55
        N_POINTS: 8192
    """)
    write(repo, "cfgs/pretrain/x.yaml", """
        dataset:
          train:
            _base_: cfgs/dataset_configs/ShapeNet-55.yaml
            N_POINTS: 2048
            others: {subset: train, npoints: 1024}
    """)
    cfg = load(repo, "cfgs/pretrain/x.yaml")
    assert cfg.dataset.train.to_dict() == {
        "NAME": "ShapeNet", "DATA_PATH": "data/ShapeNet55-34/ShapeNet-55", "N_POINTS": 2048,
        "others": {"subset": "train", "npoints": 1024}}
    assert cfg.source_of("dataset.train.NAME") == "cfgs/dataset_configs/ShapeNet-55.yaml"
    assert cfg.source_of("dataset.train.N_POINTS") == "cfgs/pretrain/x.yaml"


def test_nested_base_relative_to_the_including_file_first(repo: Path) -> None:
    write(repo, "cfgs/pretrain/ds.yaml", "NAME: Near\n")
    write(repo, "ds.yaml", "NAME: RepoRoot\n")
    write(repo, "cfgs/pretrain/x.yaml", "dataset: {train: {_base_: ds.yaml}, val: {_base_: ds.yaml}}\n")
    cfg = load(repo, "cfgs/pretrain/x.yaml")
    assert cfg.dataset.train.NAME == "Near"
    assert cfg.dataset.val.NAME == "Near"


def test_replace_marker_replaces_instead_of_merging(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "model: {_replace_: true, NAME: Other, depth: 2}\n")
    write(repo, "cfgs/b.yaml", "_base_: a.yaml\nmodel: {width: 8}\n")
    assert load(repo, "cfgs/a.yaml").model.to_dict() == {"NAME": "Other", "depth": 2}
    assert load(repo, "cfgs/b.yaml").model.to_dict() == {"NAME": "Other", "depth": 2, "width": 8}
    cfg = load(repo, "cfgs/a.yaml", ("model={_replace_: true, NAME: Cli}",))
    assert cfg.model.to_dict() == {"NAME": "Cli"}


def test_replace_marker_errors(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "model: {_delete_: true, NAME: Other}\n")
    with pytest.raises(ConfigError,
                       match=r"cfgs/a\.yaml: '_delete_' at 'model' is not supported.*_replace_: true"):
        load(repo, "cfgs/a.yaml")
    write(repo, "cfgs/b.yaml", "model: {_replace_: yes please}\n")
    with pytest.raises(ConfigError, match=r"cfgs/b\.yaml: _replace_ at 'model' must be true or false"):
        load(repo, "cfgs/b.yaml")


# ------------------------------------------------------------------ file errors


def test_cycle_lists_the_chain(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "_base_: b.yaml\n")
    write(repo, "cfgs/b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"_base_ cycle: cfgs/a\.yaml -> cfgs/b\.yaml -> cfgs/a\.yaml"):
        load(repo, "cfgs/a.yaml")


def test_nested_self_include_is_a_cycle(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "dataset: {train: {_base_: a.yaml}}\n")
    with pytest.raises(ConfigError, match=r"_base_ cycle: cfgs/a\.yaml -> cfgs/a\.yaml"):
        load(repo, "cfgs/a.yaml")


def test_same_base_twice_is_not_a_cycle(repo: Path) -> None:
    write(repo, "cfgs/ds.yaml", "NAME: D\n")
    write(repo, "cfgs/a.yaml", "_base_: ds.yaml\n")
    write(repo, "cfgs/x.yaml", "dataset: {train: {_base_: [ds.yaml, a.yaml]}, val: {_base_: ds.yaml}}\n")
    assert load(repo, "cfgs/x.yaml").dataset.val.NAME == "D"


def test_missing_file_and_missing_base(repo: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load(repo, "cfgs/nope.yaml")
    with pytest.raises(ConfigError, match=r"defaults file not found: .*nodefaults\.yaml"):
        load(repo, "cfgs/_base_/default.yaml", defaults=repo / "nodefaults.yaml")
    write(repo, "cfgs/x.yaml", "dataset:\n  train:\n    _base_: cfgs/dataset_configs/Missing.yaml\n")
    with pytest.raises(ConfigError, match=r"base file 'cfgs/dataset_configs/Missing\.yaml' not found "
                                          r"\(included from cfgs/x\.yaml at 'dataset\.train'\)"):
        load(repo, "cfgs/x.yaml")
    write(repo, "cfgs/y.yaml", "_base_: [x.yaml, 7]\n")
    with pytest.raises(ConfigError, match=r"cfgs/y\.yaml: _base_ at the top level must be a path or a list"):
        load(repo, "cfgs/y.yaml")


def test_yaml_syntax_error_names_file_and_line(repo: Path) -> None:
    write(repo, "cfgs/bad.yaml", "max_epoch: 3\noptimizer:\n  type: [AdamW\n  kwargs: {}\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error in cfgs/bad\.yaml, line \d+, column \d+"):
        load(repo, "cfgs/bad.yaml")
    write(repo, "cfgs/dup.yaml", "max_epoch: 3\nseed: 1\nmax_epoch: 4\n")
    with pytest.raises(ConfigError,
                       match=r"cfgs/dup\.yaml, line 3, column 1: found duplicate key 'max_epoch'"):
        load(repo, "cfgs/dup.yaml")


def test_bad_top_level_and_keys(repo: Path) -> None:
    write(repo, "cfgs/list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"cfgs/list\.yaml: the top level must be a mapping"):
        load(repo, "cfgs/list.yaml")
    write(repo, "cfgs/intkey.yaml", "model: {1: one}\n")
    with pytest.raises(ConfigError, match=r"cfgs/intkey\.yaml: key 1 at 'model' is not a string"):
        load(repo, "cfgs/intkey.yaml")
    write(repo, "cfgs/dot.yaml", "model: {a.b: 1}\n")
    with pytest.raises(ConfigError, match=r"key 'a\.b' at 'model' must be non-empty and contain no '\.'"):
        load(repo, "cfgs/dot.yaml")
    write(repo, "cfgs/empty.yaml", "")
    assert load(repo, "cfgs/empty.yaml") == yaml.safe_load(DEFAULTS)


# ------------------------------------------------------------------ validation


def test_unknown_key_suggests_and_names_the_file(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "optimizer: {kwargs: {lrr: 0.1}}\n")
    write(repo, "cfgs/b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"^unknown key 'optimizer\.kwargs\.lrr' \(set in cfgs/a\.yaml\); "
                                          r"did you mean 'optimizer\.kwargs\.lr'\?$"):
        load(repo, "cfgs/b.yaml")


def test_unknown_key_misplaced_or_without_match(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "lr: 0.1\n")
    with pytest.raises(ConfigError,
                       match=r"unknown key 'lr' \(set in cfgs/a\.yaml\); "
                             r"did you mean 'optimizer\.kwargs\.lr'\?"):
        load(repo, "cfgs/a.yaml")
    write(repo, "cfgs/b.yaml", "scheduler: {zzz: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'scheduler\.zzz' \(set in cfgs/b\.yaml\); "
                                          r"valid keys under 'scheduler': type, kwargs"):
        load(repo, "cfgs/b.yaml")


def test_every_problem_is_reported_at_once(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "max_epoch: ten\nmax_epochs: 3\n")
    with pytest.raises(ConfigError,
                       match=r"(?s)2 config errors:.*'max_epoch'.*'max_epochs'.*did you mean 'max_epoch'"):
        load(repo, "cfgs/a.yaml")


@pytest.mark.parametrize("line, pattern", [
    ("max_epoch: ten",
     r"wrong type for key 'max_epoch' \(set in cfgs/a\.yaml\): got 'ten' \(str\), expected int"),
    ("max_epoch: 3.5", r"key 'max_epoch' .*got 3\.5 \(float\), expected int"),
    ("max_epoch: true", r"key 'max_epoch' .*got True \(bool\), expected int"),
    ("deterministic: 1", r"key 'deterministic' .*got 1 \(int\), expected bool"),
    ("optimizer: {kwargs: {lr: fast}}",
     r"key 'optimizer\.kwargs\.lr' \(set in cfgs/a\.yaml\).*expected float"),
    ("optimizer: AdamW", r"key 'optimizer' .*got 'AdamW' \(str\), expected mapping"),
    ("best_metric: {a: 1}", r"key 'best_metric' .*got \{'a': 1\} \(mapping\), expected str"),
    ("milestones: 30", r"key 'milestones' .*got 30 \(int\), expected list of int"),
    ("milestones: [30, x]", r"key 'milestones' .*expected list of int \(default: \[30, 60\]\)"),
    ("optimizer: {kwargs: {betas: [0.9, b]}}", r"key 'optimizer\.kwargs\.betas' .*expected list of float"),
    ("model: PointMAE", r"key 'model' \(set in cfgs/a\.yaml\): got 'PointMAE' \(str\), expected mapping"),
    ("gm3d: null", r"key 'gm3d' .*got None \(null\), expected mapping"),
])
def test_wrong_type_names_key_file_value_and_expected_type(repo: Path, line: str, pattern: str) -> None:
    write(repo, "cfgs/a.yaml", line + "\n")
    with pytest.raises(ConfigError, match=pattern):
        load(repo, "cfgs/a.yaml")


def test_accepted_types(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", """
        optimizer: {kwargs: {lr: 1, betas: [1, 0.99]}}
        resume: experiments/x/ckpt-last.pth
        tags: [a, 1, {b: 2}]
        best_metric: null
        milestones: null
        gm3d: {teacher_model: {NAME: PointMAE, ckpt: t.pth}}
    """)
    cfg = load(repo, "cfgs/a.yaml")
    assert cfg.optimizer.kwargs.lr == 1
    assert cfg.resume == "experiments/x/ckpt-last.pth"
    assert cfg.tags == ["a", 1, {"b": 2}]
    assert cfg.best_metric is None and cfg.milestones is None
    assert cfg.gm3d.teacher_model.ckpt == "t.pth"
    write(repo, "cfgs/b.yaml", "resume: {any: [thing]}\n")
    assert load(repo, "cfgs/b.yaml").resume == {"any": ["thing"]}


def test_free_form_sections_pass_but_must_stay_mappings(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", """
        model: {NAME: Whatever, brand_new: [1, 2], num_group: many}
        dataset: {train: {NAME: X, others: {subset: train}}, extra_split: {NAME: Y}}
    """)
    cfg = load(repo, "cfgs/a.yaml")
    assert cfg.model.num_group == "many"
    assert cfg.dataset.extra_split.NAME == "Y"
    write(repo, "cfgs/b.yaml", "dataset: [a, b]\n")
    with pytest.raises(ConfigError,
                       match=r"wrong type for key 'dataset' \(set in cfgs/b\.yaml\).*expected mapping"):
        load(repo, "cfgs/b.yaml")
    write(repo, "cfgs/c.yaml", "gm3d: {teacher_modle: {}}\n")
    with pytest.raises(ConfigError,
                       match=r"unknown key 'gm3d\.teacher_modle'.*did you mean 'gm3d\.teacher_model'"):
        load(repo, "cfgs/c.yaml")


def test_free_form_argument_is_respected(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "model: {NAME: X, extra: 1}\nscheduler: {kwargs: {anything: 1}}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.extra'"):
        load(repo, "cfgs/a.yaml", free_form=("scheduler",))
    write(repo, "cfgs/b.yaml", "extras: {anything: 1}\n")
    assert load(repo, "cfgs/b.yaml", free_form=("extras.sub", "extras")).extras.anything == 1
    write(repo, "cfgs/c.yaml", "ext: {sub: {x: 1}}\n")
    assert load(repo, "cfgs/c.yaml", free_form=("ext.sub",)).ext.sub.x == 1


# ------------------------------------------------------------------ overrides and scalars


def test_scientific_notation_in_files_is_float(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", """
        optimizer: {kwargs: {lr: 5e-4, weight_decay: 1E-2, betas: [9e-1, 1.0e0]}}
        tags: [1e3, -2e+3, .5e1, '1e-3', 1_0e1]
    """)
    cfg = load(repo, "cfgs/a.yaml")
    assert cfg.optimizer.kwargs.lr == 5e-4 and isinstance(cfg.optimizer.kwargs.lr, float)
    assert cfg.optimizer.kwargs.weight_decay == 0.01
    assert cfg.optimizer.kwargs.betas == [0.9, 1.0]
    assert cfg.tags == [1000.0, -2000.0, 5.0, "1e-3", 100.0]


@pytest.mark.parametrize("text, key, value", [
    ("optimizer.kwargs.lr=1e-3", "optimizer.kwargs.lr", 1e-3),
    ("optimizer.kwargs.lr=5E-4", "optimizer.kwargs.lr", 5e-4),
    ("max_epoch=10", "max_epoch", 10),
    ("deterministic=true", "deterministic", True),
    ("milestones=[1, 2]", "milestones", [1, 2]),
    ("resume=null", "resume", None),
    ("resume=", "resume", None),
    ("best_metric=loss=min", "best_metric", "loss=min"),
    ("model.transformer_config.mask_type=block", "model.transformer_config.mask_type", "block"),
    ("model.new_key={a: 1}", "model.new_key", {"a": 1}),
    ("gm3d.teacher_model.ckpt=t.pth", "gm3d.teacher_model.ckpt", "t.pth"),
])
def test_overrides(repo: Path, text: str, key: str, value: object) -> None:
    write(repo, "cfgs/a.yaml", "max_epoch: 3\n")
    cfg = load(repo, "cfgs/a.yaml", (text,))
    got = cfg.get_path(key)
    assert got == value and isinstance(got, type(value))
    assert cfg.source_of(key) == COMMAND_LINE
    assert cfg.model.group_size == 32
    assert parse_override(text) == (key, value)


def test_overrides_apply_in_order_and_keep_siblings(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "optimizer: {kwargs: {lr: 0.1}}\n")
    cfg = load(repo, "cfgs/a.yaml", ("optimizer.kwargs.lr=0.2", "optimizer.kwargs.lr=3e-1",
                                     "optimizer.kwargs={weight_decay: 0}"))
    assert cfg.optimizer.kwargs.to_dict() == {"lr": 0.3, "weight_decay": 0, "betas": [0.9, 0.999]}
    assert cfg.optimizer.type == "AdamW"
    assert cfg.source_of("optimizer.type") == "cfgs/_base_/default.yaml"


def test_override_with_nested_base(repo: Path) -> None:
    write(repo, "cfgs/dataset_configs/D.yaml", "NAME: D\nN_POINTS: 8192\n")
    write(repo, "cfgs/a.yaml", "max_epoch: 3\n")
    override = "dataset.train={_base_: cfgs/dataset_configs/D.yaml, others: {subset: train}}"
    cfg = load(repo, "cfgs/a.yaml", (override,))
    assert cfg.dataset.train.to_dict() == {"NAME": "D", "N_POINTS": 8192, "others": {"subset": "train"}}
    assert cfg.source_of("dataset.train.NAME") == "cfgs/dataset_configs/D.yaml"
    assert cfg.source_of("dataset.train.others.subset") == COMMAND_LINE


@pytest.mark.parametrize("text, pattern", [
    ("max_epoch", r"malformed override 'max_epoch': expected key=value"),
    ("=3", r"malformed override '=3': expected key=value"),
    ("model..depth=3", r"malformed override 'model\.\.depth=3': empty part in key"),
    ("model._base_=x.yaml", r"override 'model\._base_=x\.yaml': set '_base_'"),
    ("max_epoch=[1, 2", r"YAML syntax error in override 'max_epoch=\[1, 2'"),
    ("max_epoch.sub=1",
     r"override 'max_epoch\.sub=1': 'max_epoch' is 300 \(set in cfgs/_base_/default\.yaml\), not a mapping"),
    ("optimizer.kwargs.lrr=1e-3", r"unknown key 'optimizer\.kwargs\.lrr' \(set in command line\); "
                                  r"did you mean 'optimizer\.kwargs\.lr'\?"),
    ("max_epoch=1e2",
     r"wrong type for key 'max_epoch' \(set in command line\): got 100\.0 \(float\), expected int"),
])
def test_bad_overrides(repo: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load(repo, "cfgs/_base_/default.yaml", (text,))


def test_overrides_must_be_a_list(repo: Path) -> None:
    with pytest.raises(ConfigError, match=r"overrides must be a list of 'key=value' strings"):
        load(repo, "cfgs/_base_/default.yaml", "max_epoch=3")  # type: ignore[arg-type]


# ------------------------------------------------------------------ Config object, provenance


def test_attribute_access_get_path_and_to_dict(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "tags: [{NAME: A}, b]\n")
    cfg = load(repo, "cfgs/a.yaml")
    assert cfg.model.transformer_config.mask_ratio == 0.6
    assert cfg.tags[0].NAME == "A"
    assert cfg.get_path("model.transformer_config.mask_type") == "rand"
    assert cfg.get_path("tags.0.NAME") == "A"
    assert cfg.get_path("model.nope.x", 7) == 7
    assert cfg.get_path("tags.5") is None
    with pytest.raises(AttributeError,
                       match=r"config has no key 'model\.num_groups'; did you mean 'num_group'"):
        cfg.model.num_groups  # noqa: B018
    plain = cfg.to_dict()
    assert plain == cfg
    assert type(plain) is dict and type(plain["model"]) is dict and type(plain["tags"][0]) is dict
    cfg.model.depth = 4
    cfg.extra = {"a": {"b": 1}}
    assert cfg["model"]["depth"] == 4 and cfg.extra.a.b == 1
    assert "depth" in dir(cfg.model)


def test_provenance(repo: Path) -> None:
    write(repo, "cfgs/dataset_configs/D.yaml", "NAME: D\n")
    write(repo, "cfgs/base.yaml", "model: {num_group: 32}\n")
    write(repo, "cfgs/pretrain/x.yaml", """
        _base_: ../base.yaml
        model: {group_size: 16}
        dataset: {train: {_base_: cfgs/dataset_configs/D.yaml, others: {subset: train}}}
    """)
    cfg = load(repo, "cfgs/pretrain/x.yaml", ("max_epoch=5",))
    assert cfg.source_of("model.num_group") == "cfgs/base.yaml"
    assert cfg.source_of("model.group_size") == "cfgs/pretrain/x.yaml"
    assert cfg.source_of("model.NAME") == "cfgs/_base_/default.yaml"
    assert cfg.source_of("dataset.train.NAME") == "cfgs/dataset_configs/D.yaml"
    assert cfg.source_of("max_epoch") == COMMAND_LINE
    assert cfg.source_of("model") == "cfgs/pretrain/x.yaml"
    assert cfg.model.source_of("num_group") == "cfgs/base.yaml"
    assert cfg.source_of("no.such.key") is None
    cfg.model.transformer_config = {"depth": 2}
    assert cfg.source_of("model.transformer_config") is None
    assert cfg.source_of("model.transformer_config.mask_ratio") is None
    assert cfg.source_of("model.num_group") == "cfgs/base.yaml"
    assert cfg.where("model") == "cfgs/pretrain/x.yaml, cfgs/_base_/default.yaml, cfgs/base.yaml: model"
    assert cfg.model.where("group_size") == "cfgs/pretrain/x.yaml: model.group_size"
    assert cfg.source_files() == ["cfgs/_base_/default.yaml", "cfgs/pretrain/x.yaml", "cfgs/base.yaml",
                                  "cfgs/dataset_configs/D.yaml", "command line: max_epoch=5"]


def test_registry_error_can_name_the_file(repo: Path) -> None:
    models = Registry("test-models")

    @models.register("PointMAE")
    def point_mae(num_group: int = 64, group_size: int = 32, transformer_config: dict | None = None) -> dict:
        return {"num_group": num_group}

    write(repo, "cfgs/a.yaml", "model: {num_group: 16}\n")
    cfg = load(repo, "cfgs/a.yaml")
    assert models.build(cfg.model.to_dict(), where=cfg.where("model")) == {"num_group": 16}
    write(repo, "cfgs/b.yaml", "model: {num_groups: 16}\n")
    cfg = load(repo, "cfgs/b.yaml")
    with pytest.raises(ConfigError, match=r"cfgs/b\.yaml, cfgs/_base_/default\.yaml: model \(PointMAE\): "
                                          r"unknown key 'num_groups'"):
        models.build(cfg.model.to_dict(), where=cfg.where("model"))


def test_pickle_and_deepcopy_keep_values_and_provenance(repo: Path) -> None:
    write(repo, "cfgs/a.yaml", "model: {num_group: 16}\n")
    cfg = load(repo, "cfgs/a.yaml", ("max_epoch=7",))
    for clone in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg), copy.copy(cfg)):
        assert isinstance(clone, Config) and isinstance(clone.model, Config)
        assert clone == cfg
        assert clone.model.transformer_config.mask_ratio == 0.6
        assert clone.source_of("model.num_group") == "cfgs/a.yaml"
        assert clone.model.source_of("num_group") == "cfgs/a.yaml"
        assert clone.source_files() == cfg.source_files()
        clone.model.transformer_config.mask_ratio = 0.9
        clone.milestones.append(90)
    assert cfg.model.transformer_config.mask_ratio == 0.6
    assert cfg.milestones == [30, 60]
    nested = pickle.loads(pickle.dumps(cfg.model))
    assert nested.source_of("num_group") == "cfgs/a.yaml"


# ------------------------------------------------------------------ saving


def test_save_load_round_trip(repo: Path) -> None:
    write(repo, "cfgs/dataset_configs/D.yaml", "NAME: D\n")
    write(repo, "cfgs/a.yaml", """
        model: {_replace_: true, NAME: X, ratios: [0.5, 1e-3], label: '1e-3', flag: 'yes', none: null}
        dataset: {train: {_base_: cfgs/dataset_configs/D.yaml, others: {subset: train}}}
        tags: [a, {b: [1, 2]}]
    """)
    cfg = load(repo, "cfgs/a.yaml", ("optimizer.kwargs.lr=2e-4",))
    out = save_config(cfg, repo / "experiments/run/config.yaml")
    assert out == repo / "experiments/run/config.yaml"
    text = out.read_text()
    assert text.startswith("# Resolved config")
    assert "#   cfgs/a.yaml\n" in text and "#   command line: optimizer.kwargs.lr=2e-4\n" in text
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert "_replace_" not in body and "_base_" not in body and "{" not in body
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]
    again = load_config(out, defaults=None)
    assert again == cfg
    assert list(again) == list(cfg) and list(again.model) == list(cfg.model)
    assert again.model.label == "1e-3" and again.model.flag == "yes"
    assert again.optimizer.kwargs.lr == 2e-4
    assert again.source_of("model.NAME") == "experiments/run/config.yaml"
    save_config(again, out)
    assert load_config(out, defaults=None) == cfg


def test_save_plain_mapping_and_unserialisable_value(tmp_path: Path) -> None:
    save_config({"a": (1, 2), "b": {"c": None}}, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", defaults=None) == {"a": [1, 2], "b": {"c": None}}
    with pytest.raises(ConfigError, match=r"cannot save config to .*d\.yaml"):
        save_config({"a": object()}, tmp_path / "d.yaml")
    assert list(tmp_path.iterdir()) == [tmp_path / "c.yaml"]


# ------------------------------------------------------------------ the repository's own configs


def test_defaults_path_points_at_the_repo_defaults() -> None:
    assert DEFAULTS_PATH == Path(__file__).resolve().parents[1] / "cfgs" / "_base_" / "default.yaml"


_SHIPPED = sorted(p for sub in ("pretrain", "finetune")
                  for p in (Path(__file__).resolve().parents[1] / "cfgs" / sub).glob("*.yaml"))


@pytest.mark.skipif(not DEFAULTS_PATH.is_file(), reason="cfgs/_base_/default.yaml not written yet")
@pytest.mark.parametrize("path", _SHIPPED, ids=[p.name for p in _SHIPPED])
def test_shipped_configs_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DEFAULTS_PATH.parents[2])
    cfg = load_config(path)
    assert isinstance(cfg.model, Config)
