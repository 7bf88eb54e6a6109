"""torch.compile over the factorized layers: with warmed plan caches the whole forward and
backward is one graph (fullgraph=True would raise otherwise) and computes what eager does;
a cold cache costs a graph break at planning, never a wrong answer. `runtime.compile` in the
pipeline gives the eager run's numbers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from tdcompress.config import load_config
from tdcompress.layers import warm_plans
from tdcompress.layers._base import DYNAMIC
from tdcompress.pipeline import Pipeline


def _loss_and_grads(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_warm_caches_compile_to_one_graph_that_matches_eager(channels_last, factorized_net):
    torch._dynamo.reset()
    model = factorized_net().train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = model[1].running_mean.clone()
    assert warm_plans(model, [tuple(x.shape)], channels_last=channels_last) == 6
    half = factorized_net().to(torch.bfloat16)  # zeros of the model's own dtype
    assert warm_plans(half, [(2, 3, 16, 16)]) == 6
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, bn)  # warm-up leaves BN statistics alone
    # one plan for the batch warmed, the same one for a batch torch.compile leaves symbolic
    for m in model.modules():
        if hasattr(m, "_plans"):
            assert len(m._plans) == 2
            (k, plan), (kd, plan_d) = sorted(m._plans.items(), key=lambda kv: -kv[0][0])
            assert k[0] == 4 and kd == (DYNAMIC, *k[1:]) and plan_d is plan
    want, want_g = _loss_and_grads(model, x)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    got, got_g = _loss_and_grads(compiled, x)  # fullgraph: raises on any graph break
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_cold_cache_under_compile_plans_outside_the_graph_and_stays_correct(factorized_net):
    torch._dynamo.reset()
    model = factorized_net().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    for m in model.modules():
        if hasattr(m, "_plans"):
            m._plans.clear()
    explained = torch._dynamo.explain(model)(x)
    # one break per factorized layer at most (its planning call), none inside the planner
    assert explained.graph_break_count <= 6
    assert all("plan_network" not in str(b.user_stack) for b in explained.break_reasons)
    assert all(len(m._plans) == 1 for m in model.modules() if hasattr(m, "_plans"))
    with torch.no_grad():
        got = torch.compile(model, backend="eager", fullgraph=True)(x)  # warm now: one graph
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_dynamic_batch_compiles_to_one_graph_for_every_batch_size(channels_last, factorized_net):
    """compile(dynamic=True): the layers read no batch size while traced (one batch-agnostic
    plan per shape), so batches 2..7 share one graph with no break, forward and backward
    match eager, and no plan is added (sizes above 7 recompile once: a guard of PyTorch's
    own conv)."""
    torch._dynamo.reset()
    model, ref = factorized_net().train(), factorized_net().train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
    warm_plans(model, [(4, 3, 16, 16)], channels_last=channels_last)
    plans = [dict(m._plans) for m in model.modules() if hasattr(m, "_plans")]
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting, fullgraph=True, dynamic=True)
    for b in (4, 3, 6, 2, 5):
        x = torch.randn(b, 3, 16, 16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        want, want_g = _loss_and_grads(ref, x)
        got, got_g = _loss_and_grads(compiled, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, g in zip(got_g, want_g):
            torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    assert [dict(m._plans) for m in model.modules() if hasattr(m, "_plans")] == plans


CFG = {
    "name": "tiny-compile",
    "seed": 0,
    "data": {"dataset": "synthetic", "batch_size": 48, "eval_batch_size": 256},
    "model": {"name": "mlp", "kwargs": {"hidden": [32, 32], "num_classes": 4}},
    "dense": {"epochs": 1, "optim": {"lr": 0.05}},
    "compress": {"format": "tt", "ranks": 4},
    "admm": {"epochs": 1, "every_steps": 5, "optim": {"lr": 0.01}},
    "finetune": {"epochs": 1, "optim": {"lr": 0.01}},
    "runtime": {"device": "cpu", "progress": False, "threads": 1},
}


def test_pipeline_with_runtime_compile_gives_the_eager_runs_metrics(tmp_path):
    torch._dynamo.reset()
    results, graphs = {}, {}
    for name, compile_ in (("eager", False), ("compiled", "eager")):
        torch._dynamo.utils.counters.clear()
        cfg_d = json.loads(json.dumps(CFG))
        cfg_d["runtime"].update(out_dir=str(tmp_path / name), compile=compile_)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg_d))
        pipe = Pipeline(load_config(tmp_path / f"{name}.yaml"))
        results[name] = pipe.run()["evaluate"]
        graphs[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        recs = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        results[name]["losses"] = [json.loads(r)["train_loss"] for r in recs if r]
    # the training forward was compiled: one graph per architecture (dense: the dense and
    # ADMM phases share it; TT: fine-tuning) and batch shape (48 and the last batch, 32);
    # evaluation stays eager
    assert graphs == {"eager": 0, "compiled": 4}
    # TorchDynamo's eager backend runs the captured graphs op by op: the eager run's numbers
    assert len(results["eager"]["losses"]) == 3
    assert results["compiled"]["losses"] == pytest.approx(results["eager"]["losses"], rel=1e-6)
    assert results["compiled"]["finetuned_acc"] == results["eager"]["finetuned_acc"]
    # the plans are warmed for both batch sizes the loader yields (512 = 10 x 48 + 32); the
    # compiled forward runs the entry for any batch (DYNAMIC), the full batch's plan
    model = pipe.compressed_model()
    train_loader = pipe.data()[0]
    assert (train_loader.num_samples, train_loader.batch_size) == (512, 48)
    compiled = pipe._compiled(model, model, train_loader)
    assert compiled is not model
    keys = {k for m in model.modules() if hasattr(m, "_plans") for k in m._plans}
    assert keys == {(48,), (32,), (DYNAMIC,)}
    assert all(
        m._plans[(DYNAMIC,)] is m._plans[(48,)] for m in model.modules() if hasattr(m, "_plans")
    )
    with pytest.raises(ValueError, match=r"runtime\.compile must be true, false or a torch"):
        load_config(None, ["runtime.compile=nonsense"])
