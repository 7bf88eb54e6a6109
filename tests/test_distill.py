"""Knowledge distillation: the soft-target loss against its closed form, its gradient, and
what it does inside train_epoch and the pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tdcompress.config import load_config
from tdcompress.train.loop import distillation_loss, train_epoch


def _closed_form(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    p_t = torch.softmax(t.double() / temp, 1)
    return temp**2 * (p_t * (p_t.log() - torch.log_softmax(s.double() / temp, 1))).sum(1).mean()


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_distillation_loss_is_the_scaled_kl_divergence_with_its_closed_form_gradient(temp):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 10, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(8, 10, generator=g, dtype=torch.float64) * 3
    loss = distillation_loss(s, t, temp)
    assert loss.item() == pytest.approx(_closed_form(s, t, temp).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, s)
    # d/ds [T^2 KL(p_t || softmax(s/T))] = T (softmax(s/T) - p_t) / batch
    expect = temp * (torch.softmax(s.detach() / temp, 1) - torch.softmax(t / temp, 1)) / 8
    torch.testing.assert_close(grad, expect, rtol=1e-10, atol=1e-12)
    assert distillation_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        distillation_loss(s, t, 0)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))] * 4
    return model, data


def _epoch(model, data, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return train_epoch(model, data, opt, device=torch.device("cpu"), progress=False, **kw)


def test_distilling_from_an_identical_teacher_alone_leaves_the_student_unchanged():
    model, data = _setup()
    before = copy.deepcopy(model.state_dict())
    _epoch(model, data, teacher=copy.deepcopy(model), distill_weight=1.0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)  # float32 round-off
    # the same epoch on cross-entropy moves it by far more
    _epoch(model, data)
    assert (model[0].weight - before["0.weight"]).abs().max() > 1e-3


def test_weight_zero_or_no_teacher_is_plain_cross_entropy_and_a_half_weight_differs():
    model, data = _setup()
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    plain, zero, half = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    r_plain = _epoch(plain, data)
    r_zero = _epoch(zero, data, teacher=teacher, distill_weight=0.0)
    _epoch(half, data, teacher=teacher, distill_weight=0.5)
    assert r_plain == r_zero
    for k, v in plain.state_dict().items():
        assert torch.equal(v, zero.state_dict()[k])
    assert not torch.allclose(plain[2].weight, half[2].weight)


def test_config_checks_the_distillation_settings():
    with pytest.raises(ValueError, match=r"finetune\.distill_weight must be in \[0, 1\], got 1\.5"):
        load_config(None, ["finetune.distill_weight=1.5"])
    with pytest.raises(ValueError, match=r"admm\.distill_temperature must be > 0, got 0"):
        load_config(None, ["admm.distill_temperature=0"])
    with pytest.raises(ValueError, match=r"dense\.distill_weight must be 0 \(the teacher is"):
        load_config(None, ["dense.distill_weight=0.5"])


def test_pipeline_distills_from_its_dense_model(tmp_path):
    from tdcompress.pipeline import Pipeline

    sets = [
        "data.dataset=synthetic",
        "data.batch_size=32",
        "model.name=mlp",
        "model.kwargs={hidden: [32], num_classes: 4}",
        "dense.epochs=2",
        "compress.ranks=4",
        "admm.epochs=1",
        "admm.distill_weight=0.5",
        "finetune.epochs=1",
        "finetune.distill_weight=0.7",
        "finetune.distill_temperature=2",
        f"runtime.out_dir={tmp_path / 'run'}",
        "runtime.device=cpu",
        "runtime.progress=false",
    ]
    p = Pipeline(load_config(None, sets))
    done = p.run()
    assert done["evaluate"]["finetuned_acc"] > 0.4  # 4 classes: learns, not chance
    teacher = p._teacher()  # the trained dense model, frozen
    dense = torch.load(tmp_path / "run" / "dense.pt")["model"]
    assert all(torch.equal(v, dense[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(q.requires_grad for q in teacher.parameters())
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["finetune"]["distill_weight"] == 0.7
    # each metrics row records its phase's distillation weight
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = {r["phase"]: r.get("distill_weight") for r in rows if "phase" in r}
    assert got == {"dense": None, "admm": 0.5, "finetune": 0.7}


def test_label_smoothing_trains_on_the_smoothed_targets():
    model, data = _setup()
    x, y = data[0]
    eps, k = 0.1, 3
    with torch.no_grad():  # closed form: (1 - eps) * CE(one-hot) + eps * mean_k(-log p_k)
        logp = torch.log_softmax(model(x), dim=1)
        want = ((1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) - eps * logp.sum(1) / k).mean()
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    got = train_epoch(
        model, data[:1], frozen, device=torch.device("cpu"), progress=False, label_smoothing=eps
    )
    assert got["loss"] == pytest.approx(want.item(), rel=1e-6)
    plain = train_epoch(model, data[:1], frozen, device=torch.device("cpu"), progress=False)
    assert plain["loss"] != pytest.approx(got["loss"], rel=1e-3)
    assert load_config(None, ["finetune.label_smoothing=0.1"]).finetune.label_smoothing == 0.1
    with pytest.raises(ValueError, match=r"admm\.label_smoothing must be in \[0, 1\), got 1\.0"):
        load_config(None, ["admm.label_smoothing=1.0"])


def test_pipeline_passes_label_smoothing_to_its_phases(tmp_path):
    from tdcompress.pipeline import Pipeline

    base = [
        "data.dataset=synthetic",
        "model.name=mlp",
        "model.kwargs={hidden: [16], num_classes: 4}",
        "dense.epochs=1",
        "runtime.device=cpu",
        "runtime.progress=false",
    ]
    losses = {}
    for eps in (0.0, 0.3):
        out = tmp_path / f"ls{eps}"
        sets = [*base, f"dense.label_smoothing={eps}", f"runtime.out_dir={out}"]
        Pipeline(load_config(None, sets)).run(("train",))
        rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        losses[eps] = rec["train_loss"]
    # the same seed, data and model: only the targets differ (near-uniform predictions at
    # the start of training make the two losses close, but not equal)
    assert losses[0.3] != losses[0.0]
    from tdcompress.report import _loss_label

    rec = json.loads((tmp_path / "ls0.3" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["label_smoothing"] == 0.3  # the row says its train_loss is the smoothed CE
    assert _loss_label("dense", rec) == "dense (label smoothing 0.3)"
    assert "label_smoothing" not in json.loads(
        (tmp_path / "ls0.0" / "metrics.jsonl").read_text().splitlines()[0]
    )
    cfg = json.loads((tmp_path / "ls0.3" / "config.json").read_text())
    assert cfg["dense"]["label_smoothing"] == 0.3
