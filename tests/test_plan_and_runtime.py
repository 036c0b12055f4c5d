"""Plans: all-dense equality on every architecture, exact JSON round trip, and every bad input named."""

from __future__ import annotations

import json

import pytest
import torch

import vdopt
from vdopt.capture import capture
from vdopt.plan import ModelFingerprint, Plan, PlanError, SitePlan, StepRange
from vdopt.strategies import Dense, PooledTopP, SpatialWindow, TemporalWindow


def _output(result):
    if isinstance(result, (tuple, list)):
        return result[0]
    return getattr(result, "sample", result)


def _plan(model, kwargs, strategy_for_head, block_size: int = 16) -> Plan:
    sites = capture(model, kwargs).sites
    plans = [SitePlan(s.name, s.heads, block_size, [StepRange(1.0, 0.6, [Dense()] * s.heads),
                                                    StepRange(0.6, 0.0, [strategy_for_head(h) for h in range(s.heads)])])
             for s in sites if s.sparsifiable]
    return Plan(ModelFingerprint.of(model), "h100", plans)


@torch.no_grad()
def test_all_dense_plan_reproduces_the_model(any_model) -> None:
    from conftest import relative_l2

    _, model, kwargs = any_model
    plan = _plan(model, kwargs, lambda h: Dense())
    opt = vdopt.apply(model, plan)
    assert relative_l2(_output(opt(**kwargs)), _output(model(**kwargs))) <= 1e-5


@torch.no_grad()
def test_sparse_plan_runs_and_warmup_is_dense(any_model) -> None:
    from conftest import relative_l2

    _, model, kwargs = any_model
    plan = _plan(model, kwargs, lambda h: [SpatialWindow(0), TemporalWindow(0)][h % 2])
    opt = vdopt.apply(model, plan)
    late = dict(kwargs, timestep=torch.full_like(kwargs["timestep"], 300))
    early = dict(kwargs, timestep=torch.full_like(kwargs["timestep"], 900))
    assert relative_l2(_output(opt(**early)), _output(model(**early))) <= 1e-5  # t = 0.9: dense warm-up range
    error = relative_l2(_output(opt(**late)), _output(model(**late)))
    assert 1e-6 < error < 0.5


@torch.no_grad()
def test_new_resolution_recaptures_and_batch_two() -> None:
    from conftest import relative_l2, tiny_wan

    model, kwargs = tiny_wan()
    plan = _plan(model, kwargs, lambda h: PooledTopP(0.7))
    opt = vdopt.apply(model, plan)
    opt(**kwargs)
    bigger = dict(kwargs, hidden_states=torch.randn(2, 4, 6, 10, 14), timestep=torch.tensor([300, 300]),
                  encoder_hidden_states=torch.randn(2, 6, 32))
    out = _output(opt(**bigger))
    assert out.shape == bigger["hidden_states"].shape and len(opt._graphs) == 2
    assert relative_l2(out, _output(model(**bigger))) < 0.5
    opt(**kwargs)
    assert len(opt._graphs) == 2  # cached, not captured again


def test_plan_json_round_trips_exactly(tmp_path) -> None:
    from conftest import tiny_cogvideox

    model, kwargs = tiny_cogvideox()
    plan = _plan(model, kwargs, lambda h: [SpatialWindow(1), PooledTopP(0.8)][h % 2])
    plan.predictions = {"attention_speedup": 1.7}
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.to_json() == plan.to_json()
    assert again.sites[0].schedule[1].heads == plan.sites[0].schedule[1].heads
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d["sites"][0]["schedule"][1]["heads"][0].update(strategy="wavelet"), r"sites\[0\].schedule\[1\].heads\[0\]: unknown strategy 'wavelet'"),
        (lambda d: d["sites"][0]["schedule"][1]["heads"].pop(), r"sites\[0\].schedule\[1\].heads lists 1 heads but the site has 2"),
        (lambda d: d["sites"][0].pop("block_size"), r"field sites\[0\].block_size is missing"),
        (lambda d: d["sites"][0].update(block_size=24), "block_size must be a power of two"),
        (lambda d: d.pop("target"), "field target is missing"),
    ],
)
def test_bad_plans_name_the_field(tmp_path, edit, message) -> None:
    from conftest import tiny_wan

    model, kwargs = tiny_wan()
    data = _plan(model, kwargs, lambda h: SpatialWindow(0)).to_json()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_corrupt_and_missing_files(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"schema_version": 1, "sites": [')
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
    with pytest.raises(PlanError, match="no plan file"):
        Plan.load(tmp_path / "absent.json")


@torch.no_grad()
def test_plan_for_another_model_is_refused_before_anything_changes() -> None:
    from conftest import tiny_dit, tiny_wan

    wan, wan_kwargs = tiny_wan()
    plan = _plan(wan, wan_kwargs, lambda h: SpatialWindow(0))
    dit, _dit_kwargs = tiny_dit()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with pytest.raises(PlanError, match="made for WanTransformer3DModel but the model is TinyVideoDiT"):
        vdopt.apply(dit, plan)
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())
    bigger = type(wan)(**{**dict(wan.config), "num_layers": 3})
    with pytest.raises(PlanError, match="num_layers=2.*has num_layers=3"):
        vdopt.apply(bigger, plan)


@torch.no_grad()
def test_plan_site_missing_from_model_is_refused() -> None:
    from conftest import tiny_wan

    model, kwargs = tiny_wan()
    plan = _plan(model, kwargs, lambda h: SpatialWindow(0))
    plan.sites[0].site = "blocks.7.attn1#0"
    opt = vdopt.apply(model, plan)
    with pytest.raises(PlanError, match="'blocks.7.attn1#0' is not an attention call of this model"):
        opt(**kwargs)
    assert not opt._graphs


def test_optimized_module_is_a_drop_in() -> None:
    from conftest import tiny_wan

    model, kwargs = tiny_wan()
    opt = vdopt.apply(model, _plan(model, kwargs, lambda h: Dense()))
    assert opt.config == model.config and opt.dtype == model.dtype
    with torch.no_grad():
        result = opt(**kwargs)
        as_tuple = opt(**kwargs, return_dict=False)
    assert hasattr(result, "sample") and isinstance(as_tuple, tuple)
