"""Saving and loading compressed models (the layers' records), compress_, densify, and
plan's filter_fn."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import yaml
from torch import nn

import tdcompress as tdc
from tdcompress.formats import available_formats, get_format
from tdcompress.layers import FactorizedLSTM
from tdcompress.layers._base import FactorizedLayer
from tdcompress.layers.lowrank import SmallFactorizedLayer

#: one layer of every format: conv "2" TT (Garipov), "4" TR, "6" Tucker-2, "8" SVD;
#: linear "12" TT, "13" SVD; "0" and "14" stay dense
FORMATS = {
    "2": {"format": "tt", "layout": "garipov"},
    "4": {"format": "tr"},
    "6": {"format": "tucker2"},
    "8": {"format": "svd"},
    "12": {"format": "tt"},
    "13": {"format": "svd"},
}


def dense_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),  # 2
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),  # 4
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2),  # 6
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1, bias=False),  # 8
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.ReLU(),
        nn.Linear(32, 16),  # 12
        nn.Linear(16, 12),  # 13
        nn.Linear(12, 10),  # 14
    )


def cnn_plan(model: nn.Module) -> tdc.CompressionPlan:
    return tdc.plan(model, "tt", ranks=3, include=list(FORMATS), overrides=FORMATS)


class SeqNet(nn.Module):
    """An nn.LSTM of two layers (its input matrices factorized) and a classifier."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lstm = nn.LSTM(12, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


def compressed_cnn() -> tuple[nn.Module, tdc.CompressionPlan]:
    model = dense_cnn()
    p = cnn_plan(model)
    tdc.compress_(model, p)
    with torch.no_grad():  # BN statistics that a wrong load would miss
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval(), p


@pytest.fixture
def forbid_decomposition(monkeypatch):
    """Call it and from then on every decomposition and every random initialisation of a
    factorized layer fails."""

    def fail(*a, **k):
        raise AssertionError("a decomposition or initialisation ran while loading")

    def forbid() -> None:
        for name in available_formats():
            monkeypatch.setattr(get_format(name), "decompose", fail)
        monkeypatch.setattr(FactorizedLayer, "from_dense", classmethod(fail))
        for cls in (FactorizedLayer, SmallFactorizedLayer, FactorizedLSTM):
            monkeypatch.setattr(cls, "reset_parameters", fail)
        # and the decompositions themselves, wherever they are imported
        for mod in ("tensor", "tensor.tt", "tensor.tr", "tensor.tucker", "tensor.lowrank"):
            mod = importlib.import_module(f"tdcompress.{mod}")
            for fn in ("tt_svd", "tr_svd", "tucker", "lowrank_svd", "truncate"):
                if callable(getattr(mod, fn, None)):
                    monkeypatch.setattr(mod, fn, fail)
        for fmt in ("tt", "tr", "tucker2", "lowrank"):
            mod = importlib.import_module(f"tdcompress.formats.{fmt}")
            for fn in ("tt_svd", "tr_svd", "tucker", "lowrank_svd"):
                if callable(getattr(mod, fn, None)):
                    monkeypatch.setattr(mod, fn, fail)

    return forbid


def test_a_state_dict_says_what_each_factorized_layer_is(tmp_path):
    model, _ = compressed_cnn()
    path = tdc.save_compressed(model, tmp_path / "m.pt")
    st = torch.load(path, weights_only=True)  # plain data: no pickled classes
    sd = st["model"]
    rec = sd["2._extra_state"]
    assert rec["class"] == "TTConv2d" and rec["spec"]["layout"] == "garipov"
    assert rec["geometry"] == {
        "kind": "conv2d",
        "out_features": 16,
        "in_features": 8,
        "kernel_size": [3, 3],
        "stride": [2, 2],
        "padding": [1, 1],
        "dilation": [1, 1],
        "groups": 1,
        "bias": True,
    }
    assert {k: sd[f"{k}._extra_state"]["class"] for k in FORMATS} == {
        "2": "TTConv2d",
        "4": "TRConv2d",
        "6": "Tucker2Conv2d",
        "8": "LowRankConv2d",
        "12": "TTLinear",
        "13": "LowRankLinear",
    }
    assert sd["8._extra_state"]["geometry"]["bias"] is False
    json.dumps([v for k, v in sd.items() if k.endswith("_extra_state")])  # JSON-able
    assert "0._extra_state" not in sd and st["plan"] is None


def test_load_compressed_rebuilds_the_model_without_decomposing(tmp_path, forbid_decomposition):
    model, p = compressed_cnn()
    x = torch.randn(4, 3, 12, 12)
    want = model(x)
    path = tdc.save_compressed(model, tmp_path / "m.pt", plan=p, meta={"note": "x"})
    forbid_decomposition()
    with pytest.raises(AssertionError, match="a decomposition"):  # (the oracle bites)
        tdc.decompose(dense_cnn(), p)
    # another seed: every weight must come from the file
    for make in (lambda: dense_cnn(seed=1), dense_cnn(seed=1)):
        got = tdc.load_compressed(path, make).eval()
        assert torch.equal(got(x), want)
        for name in FORMATS:
            layer, ref = got.get_submodule(name), model.get_submodule(name)
            assert type(layer) is type(ref) and layer.spec == ref.spec
            assert layer.geometry == ref.geometry
    assert torch.equal(got[1].running_var, model[1].running_var)
    # loading into the compressed model itself (its layers kept, records checked)
    again = tdc.load_compressed(path, got)
    assert again is got and torch.equal(again(x), want)
    st = torch.load(path, weights_only=True)
    assert st["tdcompress"]["meta"] == {"note": "x"}
    assert tdc.CompressionPlan.from_dict(st["plan"]).to_dict() == p.to_dict()


def test_load_compressed_keeps_the_device_dtype_and_training_mode_of_the_dense_layers(tmp_path):
    model, _ = compressed_cnn()
    path = tdc.save_compressed(model.double(), tmp_path / "m.pt")
    dense = dense_cnn().double().train()
    got = tdc.load_compressed(path, dense)
    assert all(p.dtype == torch.float64 for p in got.parameters())
    assert got[2].training
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(got.eval()(x), model(x), rtol=0, atol=0)


def _lstm_model() -> nn.Module:
    model = SeqNet()
    p = tdc.plan(model, "tt", ranks=3, include=["lstm.l0"], lstm=True)
    tdc.compress_(model, p)
    return model.eval()


def test_a_factorized_lstm_round_trips(tmp_path, forbid_decomposition):
    model = _lstm_model()
    assert isinstance(model.lstm, FactorizedLSTM)
    x = torch.randn(3, 5, 12)
    want = model(x)
    path = tdc.save_compressed(model, tmp_path / "lstm.pt")
    sd = torch.load(path, weights_only=True)["model"]
    assert sd["lstm._extra_state"]["hidden_size"] == 8
    assert sd["lstm.input_layers.0._extra_state"]["class"] == "TTLinear"
    assert "lstm.input_layers.1._extra_state" not in sd  # layer 1 kept its dense matrix
    forbid_decomposition()
    got = tdc.load_compressed(path, SeqNet(seed=3)).eval()
    assert isinstance(got.lstm, FactorizedLSTM) and torch.equal(got(x), want)
    # an LSTM of another size is refused, naming the layer
    with pytest.raises(ValueError, match=r"layer 'lstm'.*hidden_size"):
        bad = SeqNet()
        bad.lstm = nn.LSTM(12, 9, num_layers=2, batch_first=True)
        tdc.load_compressed(path, bad)


def test_densify_gives_plain_layers_computing_the_same_function():
    model, _ = compressed_cnn()
    model = model.double()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    dense = tdc.densify(model)
    assert dense is not model and isinstance(model[2], FactorizedLayer)  # a copy
    assert not [m for m in dense.modules() if isinstance(m, FactorizedLayer)]
    for name in FORMATS:
        layer, plain = model.get_submodule(name), dense.get_submodule(name)
        assert type(plain) in (nn.Linear, nn.Conv2d)
        assert torch.equal(plain.weight, layer.to_dense())
        assert (plain.bias is None) == (layer.bias is None)
    assert dense[2].stride == (2, 2) and dense[6].dilation == (2, 2)
    torch.testing.assert_close(dense(x), model(x), rtol=1e-12, atol=1e-12)
    assert tdc.densify(model, inplace=True) is model and type(model[2]) is nn.Conv2d
    # a factorized layer alone becomes its dense layer
    tt = tdc.layers.TTLinear(32, 16, ranks=4, dtype=torch.float64)
    lin = tdc.densify(tt)
    y = torch.randn(5, 32, dtype=torch.float64)
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(y), tt(y), rtol=1e-12, atol=1e-12)


def test_densify_turns_a_factorized_lstm_into_an_nn_lstm():
    model = _lstm_model().double()
    model.lstm.input_layers[1] = nn.Linear(8, 32, dtype=torch.float64)  # with its own bias
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    dense = tdc.densify(model)
    assert type(dense.lstm) is nn.LSTM and dense.lstm.batch_first
    torch.testing.assert_close(dense(x), model(x), rtol=1e-12, atol=1e-12)
    # without the LSTM's biases, an input layer's bias still counts
    f = FactorizedLSTM(
        4, 6, bias=False, input_layers=[nn.Linear(4, 24)], dtype=torch.float64
    ).double()
    seq = torch.randn(7, 2, 4, dtype=torch.float64)
    lstm = tdc.densify(f)
    torch.testing.assert_close(lstm(seq)[0], f(seq)[0], rtol=1e-12, atol=1e-12)


def test_densify_some_layers_those_that_run_rebuilt_everywhere():
    """densify(layers=...) turns only the named modules into PyTorch's layers: with
    rebuilt_everywhere, the layers whose every execution choice is rebuilt and the LSTMs
    whose input layers all are (a layer rebuilt for one shape only, or factorized, stays);
    the function is unchanged; unknown names and a bare string are refused."""
    from tdcompress.layers import ANY_SHAPE, rebuilt_everywhere, set_execution

    model, _ = compressed_cnn()
    model = model.double()
    names = list(FORMATS)
    set_execution(model.get_submodule(names[0]), ANY_SHAPE, "rebuilt")
    set_execution(model.get_submodule(names[1]), (4,), "rebuilt")
    set_execution(model.get_submodule(names[1]), (8,), "factorized")
    assert rebuilt_everywhere(model) == [names[0]]
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    part = tdc.densify(model, layers=rebuilt_everywhere(model))
    assert type(part.get_submodule(names[0])) in (nn.Linear, nn.Conv2d)
    assert all(isinstance(part.get_submodule(n), FactorizedLayer) for n in names[1:])
    torch.testing.assert_close(part(x), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"layers names \['nope'\], which are not"):
        tdc.densify(model, layers=["nope"])
    with pytest.raises(TypeError, match="layers must be a collection of module names"):
        tdc.densify(model, layers=names[0])
    # an LSTM: listed whole once its input layers all run dense, never its input layers
    seq = _lstm_model().double()
    assert rebuilt_everywhere(seq) == []
    set_execution(seq.lstm.input_layers[0], ANY_SHAPE, "rebuilt")
    assert rebuilt_everywhere(seq) == ["lstm"]
    y = torch.randn(3, 5, 12, dtype=torch.float64)
    dense = tdc.densify(seq, layers=["lstm"])
    assert type(dense.lstm) is nn.LSTM
    torch.testing.assert_close(dense(y), seq(y), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not factorized layers or LSTMs"):
        tdc.densify(seq, layers=["lstm.input_layers.0"])


def test_compress_in_place_equals_decompose_and_takes_a_filter():
    ref = dense_cnn()
    p = cnn_plan(ref)
    want, want_report = tdc.decompose(ref, p)
    model = dense_cnn()
    report = tdc.compress_(model, p)
    assert report.errors == want_report.errors and report.ratio == want_report.ratio
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.eval()(x), want.eval()(x))
    # a format name plans here; filter_fn picks among the selected layers
    m2 = dense_cnn()
    seen = []

    def only_linear(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return isinstance(module, nn.Linear)

    r2 = tdc.compress_(m2, "svd", ranks=2, include=["*"], filter_fn=only_linear)
    assert sorted(r2.errors) == ["12", "13", "14"]
    assert seen == ["0", "2", "4", "6", "8", "12", "13", "14"]
    with pytest.raises(ValueError, match=r"CompressionPlan and the planning arguments \['ranks'\]"):
        tdc.compress_(dense_cnn(), p, ranks=2)
    with pytest.raises(TypeError, match="plan_or_format must be a CompressionPlan or a format"):
        tdc.compress_(dense_cnn(), 3)


def test_plan_filter_fn_is_applied_after_include_and_exclude():
    model = dense_cnn()
    p = tdc.plan(model, "tt", ranks=2, filter_fn=lambda m, n: n != "4")
    default = tdc.plan(model, "tt", ranks=2)
    assert [lp.name for lp in p] == [lp.name for lp in default if lp.name != "4"]
    with pytest.raises(TypeError, match="filter_fn must be a callable"):
        tdc.plan(model, "tt", ranks=2, filter_fn="conv")
    with pytest.raises(ValueError, match="no layer selected"):
        tdc.plan(model, "tt", ranks=2, filter_fn=lambda m, n: False)


def test_files_of_older_runs_without_records_load_with_their_plan(tmp_path, forbid_decomposition):
    model, p = compressed_cnn()
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    torch.save({"model": old}, tmp_path / "old.pt")
    forbid_decomposition()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"old\.pt: holds no factorized-layer records.*plan="):
        tdc.load_compressed(tmp_path / "old.pt", dense_cnn())
    got = tdc.load_compressed(tmp_path / "old.pt", dense_cnn(seed=2), plan=p).eval()
    assert torch.equal(got(x), model(x))


def test_loading_refuses_what_does_not_fit(tmp_path):
    model, p = compressed_cnn()
    path = tdc.save_compressed(model, tmp_path / "m.pt")
    wide = dense_cnn()
    wide[4] = nn.Conv2d(16, 16, 5, padding=2)
    with pytest.raises(ValueError, match=r"layer '4': the model's layer is .*kernel_size.*\[5, 5"):
        tdc.load_compressed(path, wide)
    short = nn.Sequential(*list(dense_cnn())[:10])
    with pytest.raises(ValueError, match=r"the model has no layer '12'"):
        tdc.load_compressed(path, short)
    assert type(short[2]) is nn.Conv2d  # nothing swapped before the refusal
    # a TT state dict loaded into a model of other ranks: the record says what differs
    other = dense_cnn()
    tdc.compress_(other, "tt", ranks=2, include=["2"])
    sd = model.state_dict()
    with pytest.raises(ValueError, match=r"TTConv2d: the state dict holds a TTConv2d with .*ranks"):
        other[2].load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("2.")})
    # a record of a newer tdcompress
    sd["2._extra_state"] = dict(sd["2._extra_state"], tdcompress_layer=99)
    torch.save({"model": sd}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=r"version 99; this tdcompress reads versions 1 to 1"):
        tdc.load_compressed(tmp_path / "new.pt", dense_cnn())
    # a truncated file
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable PyTorch file"):
        tdc.load_compressed(tmp_path / "cut.pt", dense_cnn())
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: no such file"):
        tdc.load_compressed(tmp_path / "nope.pt", dense_cnn())
    with pytest.raises(ValueError, match="has no factorized layer to record"):
        tdc.save_compressed(dense_cnn(), tmp_path / "d.pt")
    assert not (tmp_path / "d.pt").exists()


def test_the_pipeline_saves_and_rebuilds_its_models_through_the_records(
    tmp_path, forbid_decomposition
):
    from tdcompress.config import load_config
    from tdcompress.pipeline import Pipeline

    cfg = {
        "seed": 0,
        "data": {"dataset": "synthetic", "batch_size": 64, "eval_batch_size": 256},
        "model": {"name": "mlp", "kwargs": {"hidden": [32, 32], "num_classes": 4}},
        "dense": {"epochs": 1},
        "compress": {"format": "tt", "ranks": 4},
        "admm": {"epochs": 0},
        "finetune": {"epochs": 1},
        "runtime": {"device": "cpu", "progress": False, "threads": 1, "out_dir": str(tmp_path)},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    pipe = Pipeline(load_config(tmp_path / "c.yaml"))
    pipe.run(("train", "plan", "admm", "decompose", "finetune"))
    st = torch.load(tmp_path / "finetuned.pt", weights_only=True)
    assert st["model"]["hidden.0._extra_state"]["class"] == "TTLinear"
    assert st["plan"] == pipe.load_plan().to_dict()
    x = torch.randn(5, 1, 8, 8)
    want = pipe.compressed_model().eval()(x)
    forbid_decomposition()  # nothing is decomposed to rebuild it
    got = pipe.compressed_model()
    assert torch.equal(got.eval()(x), want)
    # a run folder of an older tdcompress: its files hold state dicts without records
    for f in ("finetuned.pt", "decomposed.pt", "finetune.ckpt.pt"):
        st = torch.load(tmp_path / f, weights_only=False)
        st["model"] = {k: v for k, v in st["model"].items() if not k.endswith("_extra_state")}
        torch.save(st, tmp_path / f)
    assert torch.equal(pipe.compressed_model().eval()(x), want)
    ev = pipe.run(("finetune", "evaluate"), force=True)["evaluate"]  # resumes the old ckpt
    assert ev["finetuned_acc"] is not None


class Conv1D(nn.Module):  # the shape of Hugging Face's GPT-2 Conv1D (weight stored (in, out))
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).view(
            *x.shape[:-1], self.nf
        )


def _conv1d_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), Conv1D(48, 32), nn.ReLU(), nn.Linear(48, 4))


def test_conv1d_layers_save_and_load(tmp_path) -> None:
    model = _conv1d_model()
    p = tdc.plan(model, "tt", ranks=4, include=["1"], input_shape=(1, 16))
    c, _ = tdc.decompose(model, p)
    tdc.save_compressed(c, tmp_path / "m.pt")
    back = tdc.load_compressed(tmp_path / "m.pt", _conv1d_model())
    x = torch.randn(3, 16)
    torch.testing.assert_close(back(x), c(x), rtol=0, atol=0)


def test_old_state_dicts_load_with_plain_load_state_dict_and_mismatches_name_the_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    p = tdc.plan(model, "tt", ranks=2, include=["0", "2"], input_shape=(1, 16))
    c, _ = tdc.decompose(model, p)
    old = {k: v for k, v in c.state_dict().items() if not k.endswith("_extra_state")}
    twin, _ = tdc.decompose(model, p, init="random")
    twin.load_state_dict(old)  # strict: the records are the layers' own
    x = torch.randn(2, 16)
    torch.testing.assert_close(twin(x), c(x), rtol=0, atol=0)
    other, _ = tdc.decompose(
        model,
        tdc.plan(model, "tt", ranks=3, include=["0", "2"], input_shape=(1, 16)),
        init="random",
    )
    with pytest.raises(ValueError, match="layer '0'"):
        other.load_state_dict(c.state_dict(), strict=False)


def test_a_child_called_module_is_not_a_wrapper(tmp_path) -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.module(x))

    p = tdc.plan(Net(), "tt", ranks=2, include=["module.0"], input_shape=(1, 16))
    c, _ = tdc.decompose(Net(), p)
    tdc.save_compressed(c, tmp_path / "m.pt")
    sd = torch.load(tmp_path / "m.pt", weights_only=True)["model"]
    assert "head.weight" in sd
    back = tdc.load_compressed(tmp_path / "m.pt", Net())
    x = torch.randn(2, 16)
    torch.testing.assert_close(back(x), c(x), rtol=0, atol=0)
