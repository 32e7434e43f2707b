"""The training config tree: YAML files, overrides, validation messages, schedule arithmetic."""

from pathlib import Path

import pytest

from oclear_ray.config import TrainConfig, load_config, train_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert cfg.total_steps > 0
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_cpu_small_is_the_default():
    small = load_config(str(Path(__file__).parent.parent / "configs" / "cpu-small.yaml"))
    assert small.to_dict() == TrainConfig().to_dict()


def test_overrides_and_step_scaling():
    cfg = train_config(None, workers=3, steps=45, max_minutes=2.5)
    assert (cfg.run.workers, cfg.run.max_minutes) == (3, 2.5)
    assert [s.steps for s in cfg.schedule] == [30, 15]
    stages = [cfg.stage_at(cfg.progress(s)).name for s in range(cfg.total_steps)]
    assert stages == ["align"] * 30 + ["fuse"] * 15


def test_lr_schedule_warms_up_and_decays():
    cfg = TrainConfig()
    f = [cfg.lr_factor(s, cfg.progress(s)) for s in range(cfg.total_steps)]
    assert f[0] == pytest.approx(1 / cfg.optim.warmup_steps)
    assert max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.05, abs=1e-3)


def test_a_time_budget_moves_the_schedule_on():
    """Out of time at a quarter of the steps, the run is at its last stage with lr decayed."""
    cfg = train_config(None, steps=50)
    assert cfg.progress(12) == pytest.approx(0.24)
    assert cfg.progress(12, time_fraction=0.99) == pytest.approx(0.99)
    assert cfg.progress(12, time_fraction=2.0) == 1.0
    assert cfg.stage_at(cfg.progress(3, 0.8)).name == "fuse"
    assert cfg.stage_at(cfg.progress(3, 0.5)).name == "align"
    assert cfg.lr_factor(40, 1.0) == pytest.approx(0.05)
    assert cfg.lr_factor(40, 0.5) < cfg.lr_factor(40, 0.4)


def test_a_budget_without_steps_is_the_schedule():
    """--max-minutes alone fills the time: stages and decay follow the clock, not the steps."""
    cfg = train_config(None, max_minutes=30)
    assert cfg.run.schedule_by == "time"
    assert cfg.progress(10_000, time_fraction=0.5) == pytest.approx(0.5)  # steps don't count
    assert cfg.stage_at(cfg.progress(5_000, 0.6)).name == "align"  # align owns 600 / 900
    assert cfg.stage_at(cfg.progress(5_000, 0.7)).name == "fuse"
    f = [cfg.lr_factor(100, t / 10) for t in range(11)]
    assert f == sorted(f, reverse=True) and f[0] == pytest.approx(1.0) and f[-1] == 0.05
    assert cfg.lr_factor(0, 0.0) == pytest.approx(1 / cfg.optim.warmup_steps)
    capped = train_config(None, steps=90, max_minutes=30)  # with steps, the budget only caps
    assert capped.run.schedule_by == "steps" and capped.progress(45, 0.1) == 0.5
    assert train_config(None).run.schedule_by == "steps"
    with pytest.raises(ValueError, match="schedule_by 'time' needs run.max_minutes"):
        load_config(None, {"run.schedule_by": "time"})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"head": {"margin": "softmax"}}, "head.margin must be one of"),
        ({"head": {"sample_rate": 0}}, r"head.sample_rate must be in \(0, 1\], got 0"),
        ({"run": {"precision": "fp8"}}, "run.precision must be one of"),
        ({"run": {"workers": 0}}, "run.workers must be >= 1, got 0"),
        ({"data": {"view_tasks": -1}}, "data.view_tasks must be >= 0, got -1"),
        ({"schedule": [{"name": "a", "steps": 1, "towers": "text"}]}, "towers must be one of"),
        ({"schedule": []}, "schedule needs at least one stage"),
        ({"run": {"wrokers": 2}}, r"unknown key\(s\) \['wrokers'\] in run \(known: workers,"),
        ({"model": {"image": {"nmae": "x"}}}, r"unknown key\(s\) \['nmae'\] in model.image"),
        ({"model": {"image": {"levels": "cmyk"}}}, "model.image.levels must be one of"),
        ({"optim": {"lr": "fast"}}, "optim.lr must be float, got 'fast'"),
        ({"run": {"workers": True}}, "run.workers must be int, got True"),
        ({"run": {"workers": 2.5}}, "run.workers must be int, got 2.5"),
        ({"schedule": [{"name": "a", "steps": "x"}]}, "schedule.0.steps must be int, got 'x'"),
        ({"schedule": {"name": "a"}}, "schedule must be a list"),
    ],
)
def test_bad_values_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data)


def test_fusion_options_validate():
    cfg = TrainConfig.from_dict(
        {
            "head": {"text_weight": 0.5},
            "data": {"doc_as_query_rate": 0.5, "doc_query_view": "outline"},
        }
    )
    assert (cfg.head.text_weight, cfg.data.doc_query_view) == (0.5, "outline")
    with pytest.raises(ValueError, match="text_weight"):
        TrainConfig.from_dict({"head": {"text_weight": -1.0}})
    with pytest.raises(ValueError, match="doc_query_view"):
        TrainConfig.from_dict({"data": {"doc_query_view": "sketch"}})


def test_yaml_strings_are_read_as_the_numbers_fields_want(tmp_path):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: the field's type decides."""
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-3, head_lr: 5E-4}\nrun: {max_minutes: '2.5', workers: '3'}\n")
    cfg = load_config(str(path))
    assert (cfg.optim.lr, cfg.optim.head_lr) == (0.001, 0.0005)
    assert isinstance(cfg.optim.lr, float)
    assert (cfg.run.max_minutes, cfg.run.workers) == (2.5, 3)
    model = TrainConfig.from_dict({"model": {"embed_dim": "64", "preprocess": {"mean": [1, 0, 0]}}})
    assert model.model.embed_dim == 64 and model.model.preprocess.mean == (1.0, 0.0, 0.0)


def test_set_overrides_any_field_after_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.1}\nrun: {workers: 3}\n")
    cfg = train_config(
        str(path),
        workers=4,
        sets=[
            "optim.lr=1e-3",
            "schedule.1.steps=7",
            "model.image.name=resnet18",
            "head.text_weight=null",
        ],
    )
    assert (cfg.optim.lr, cfg.run.workers, cfg.model.image.name) == (0.001, 4, "resnet18")
    assert [s.steps for s in cfg.schedule] == [600, 7] and cfg.head.text_weight is None
    assert train_config(None, sets=["run.workers=1"], workers=3).run.workers == 1


@pytest.mark.parametrize(
    "pair, message",
    [
        ("optim.lrr=1", r"--set optim.lrr: no key 'lrr' in optim \(known: lr, head_lr,"),
        ("optimizer.lr=1", r"--set optimizer.lr: no key 'optimizer' in the config"),
        ("schedule.2.steps=1", r"--set schedule.2.steps: schedule has 2 entries, no '2'"),
        ("run.workers.x=1", r"--set run.workers.x: no key 'x' in run.workers"),
        ("run.workers=two", "run.workers must be int, got 'two'"),
        ("run.use_gpu=3", "run.use_gpu must be bool, got 3"),
        ("run.workers", r"--set takes KEY=VALUE \(e.g. optim.lr=1e-3\), got 'run.workers'"),
    ],
)
def test_set_names_a_wrong_key_or_type(pair, message):
    with pytest.raises(ValueError, match=message):
        train_config(None, sets=[pair])
