"""tdcompress.export and `tdcompress export`: the written file, run on new inputs, matches the
eager model; a mismatching export is never kept; bad arguments are named."""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest
import torch
import yaml
from torch import nn

import tdcompress.export as export_mod
from tdcompress.cli import main
from tdcompress.export import export_model

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxscript not installed")
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_pt2_export_runs_new_inputs_like_the_model(tmp_path, factorized_net):
    model = factorized_net().train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    x = torch.randn(2, 3, 16, 16)
    res = export_model(model, x, tmp_path / "m.pt2")
    # every module's own mode is restored
    assert model.training and not model[1].training and model[3].training
    assert res.format == "pt2" and res.checked_with == "torch.export.load"
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4
    assert res.params == sum(p.numel() for p in model.parameters())
    assert res.file_bytes == (tmp_path / "m.pt2").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temporary file left
    # a different input of the same shape: the graph computes, it did not store an answer
    x2 = torch.randn(2, 3, 16, 16)
    got = torch.export.load(tmp_path / "m.pt2").module()(x2)
    torch.testing.assert_close(got, _eager(model, x2), rtol=1e-5, atol=1e-5)


@needs_onnx
def test_onnx_export_runs_new_inputs_like_the_model(tmp_path, factorized_net):
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = factorized_net()
    res = export_model(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert res.format == "onnx" and res.checked_with in ("onnxruntime", "onnx.reference")
    # one self-contained file (the weights inside, no external .data file, nothing temporary)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and res.files == (res.path,)
    assert res.file_bytes > 4 * res.params
    proto = onnx.load(str(tmp_path / "m.onnx"))
    x2 = torch.randn(1, 3, 16, 16)
    got = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x2.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _eager(model, x2), rtol=1e-4, atol=1e-5)


@needs_onnx
def test_onnx_debug_metadata_is_removed_unless_asked_for(tmp_path, factorized_net):
    import onnx

    model, x = factorized_net(), torch.randn(2, 3, 16, 16)
    lean = export_model(model, x, tmp_path / "lean.onnx")
    full = export_model(model, x, tmp_path / "full.onnx", debug_metadata=True)

    def node_metadata(path):
        return sum(len(n.metadata_props) for n in onnx.load(str(path)).graph.node)

    assert node_metadata(full.path) > 0 and node_metadata(lean.path) == 0
    assert lean.file_bytes < full.file_bytes
    # the same graph and weights otherwise: both were run and checked against the model
    assert lean.max_abs_diff <= 1e-4 and full.max_abs_diff <= 1e-4
    a, b = onnx.load(str(lean.path)), onnx.load(str(full.path))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]


def test_a_mismatching_export_is_not_kept(tmp_path, monkeypatch, factorized_net):
    model = factorized_net()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "m.pt2"
    path.write_bytes(b"an older export")

    def wrong(p, fmt, runs, names):
        return [[_eager(model, *xs) + 0.01] for xs in runs], "a broken runtime"

    monkeypatch.setattr(export_mod, "_run_exported", wrong)
    with pytest.raises(RuntimeError, match=r"differs from the model by up to 0\.01.*broken"):
        export_model(model, x, path)
    assert path.read_bytes() == b"an older export"  # left as it was
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]
    monkeypatch.setattr(export_mod, "_run_exported", lambda p, f, r, n: ([[torch.zeros(3)]], "x"))
    with pytest.raises(RuntimeError, match=r"output of shape \(3,\), the model \(1, 10\)"):
        export_model(model, x, path)
    res = export_model(model, x, path, check=False)  # unchecked: written, and says so
    assert res.checked_with is None and "not checked" in res.summary()


@pytest.mark.parametrize("example_batch", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pt2_dynamic_batch_runs_any_batch_size(
    tmp_path, factorized_net, example_batch, channels_last
):
    model = factorized_net()
    x = torch.randn(example_batch, 3, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    res = export_model(model, x, tmp_path / "m.pt2", dynamic_batch=True)
    # checked at the example's batch size and one more (1, or 3 after a batch-1 example)
    assert res.dynamic_batch and res.checked_batch_sizes == (
        example_batch,
        3 if example_batch == 1 else 1,
    )
    assert "input (N, 3, 16, 16)" in res.summary() and "at batch sizes" in res.summary()
    run = torch.export.load(tmp_path / "m.pt2").module()
    for n in (1, 2, 5):  # batch sizes the export never saw, on fresh data
        xn = torch.randn(n, 3, 16, 16)
        if channels_last:
            xn = xn.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(run(xn), _eager(model, xn), rtol=1e-5, atol=1e-5)
    # without dynamic_batch the graph refuses another batch size
    export_model(model, x, tmp_path / "s.pt2")
    static = torch.export.load(tmp_path / "s.pt2")
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        static.module()(torch.randn(example_batch + 1, 3, 16, 16))
    # and the free batch costs nothing: the same operators as the static graph for the batch
    # size it was planned for (>= 2; a channels_last example stays channels_last at 2)
    if example_batch == 1:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        export_model(model, torch.cat([x, x]).contiguous(memory_format=fmt), tmp_path / "s.pt2")
        static = torch.export.load(tmp_path / "s.pt2")
    dynamic = torch.export.load(tmp_path / "m.pt2")
    assert _aten_ops(dynamic) == _aten_ops(static)


def _aten_ops(program) -> dict[str, int]:
    """How many times each compute operator occurs in an exported program (views, sizes and
    symbolic-shape bookkeeping left out)."""
    skip = ("view", "reshape", "sym_", "_assert", "expand", "unsqueeze", "squeeze", "alias")
    ops: dict[str, int] = {}
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function":
            name = str(node.target).removeprefix("aten.").split(".")[0]
            if not name.startswith(skip):
                ops[name] = ops.get(name, 0) + 1
    return ops


def test_dynamic_batch_export_of_a_factorized_lstm(tmp_path):
    from tdcompress.layers import FactorizedLSTM, TTLinear

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = FactorizedLSTM(
                32, 8, batch_first=True, input_layers=[TTLinear(32, 32, ranks=2)]
            )
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Net()
    res = export_model(model, torch.randn(4, 5, 32), tmp_path / "m.pt2", dynamic_batch=True)
    assert res.checked_batch_sizes == (4, 1)
    run = torch.export.load(tmp_path / "m.pt2").module()
    for n in (1, 6):
        xn = torch.randn(n, 5, 32)
        with torch.no_grad():
            torch.testing.assert_close(run(xn), _eager(model, xn), rtol=1e-5, atol=1e-5)


@needs_onnx
def test_onnx_dynamic_batch_runs_any_batch_size(tmp_path, factorized_net):
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = factorized_net()
    res = export_model(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", dynamic_batch=True)
    assert res.checked_batch_sizes == (2, 1)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # a named, free dimension
    ref = ReferenceEvaluator(proto)
    for n in (1, 5):
        xn = torch.randn(n, 3, 16, 16)
        got = ref.run(None, {proto.graph.input[0].name: xn.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), _eager(model, xn), rtol=1e-4, atol=1e-5)


def test_dynamic_batch_needs_a_batch_dimension(tmp_path, factorized_net):
    with pytest.raises(
        ValueError, match=r"dynamic_batch needs .* size >= 1, got shape \(0, 3, 16, 16\)"
    ):
        export_model(
            factorized_net(), torch.randn(0, 3, 16, 16), tmp_path / "m.pt2", dynamic_batch=True
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"path": "m.bin"}, ValueError, r"path .*m\.bin.*suffix '\.bin'.*\['\.onnx', '\.pt2'\]"),
        (
            {"format": "tflite"},
            ValueError,
            r"format must be one of \['onnx', 'pt2'\], got 'tflite'",
        ),
        (
            {"example_input": [1.0]},
            TypeError,
            r"example_input must be a torch\.Tensor or a tuple of positional inputs, got list",
        ),
        (
            {"path": "m.onnx", "format": "pt2"},
            ValueError,
            r"path .*m\.onnx.* suffix of format 'onnx' but format is 'pt2'; name the file \*\.pt2",
        ),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, err, match, factorized_net):
    args = {"path": "m.pt2", "example_input": torch.randn(1, 3, 16, 16), **kwargs}
    with pytest.raises(err, match=match):
        export_model(
            factorized_net(),
            args["example_input"],
            tmp_path / args["path"],
            format=kwargs.get("format"),
        )
    assert not list(tmp_path.iterdir())


def test_cli_exports_the_runs_finetuned_model(tmp_path, capsys):
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 256},
        "model": {"name": "mlp", "kwargs": {"hidden": [32], "num_classes": 4}},
        "dense": {"epochs": 1},
        "compress": {"format": "tt", "ranks": 4},
        "admm": {"epochs": 1, "every_steps": 8},
        "finetune": {"epochs": 1},
        "runtime": {
            "device": "cpu",
            "progress": False,
            "threads": 1,
            "out_dir": str(tmp_path / "run"),
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # before the fine-tuning stage has run: a clear error, no model file written
    assert main(["export", str(path)]) == 2
    assert "finetuned.pt' does not exist: run the finetune stage" in capsys.readouterr().err
    assert main(["pipeline", str(path), "--set", "finetune.epochs=1"]) == 0
    # the pipeline ends by naming the export command for this run (its options included)
    out = capsys.readouterr().out.splitlines()
    hint = next(x for x in out if x.startswith("export: ")).removeprefix("export: ")
    argv = shlex.split(hint.split("  (or")[0])
    assert argv[:3] == ["tdcompress", "export", str(path)] and "finetune.epochs=1" in argv
    assert argv[-2:] == ["--format", "onnx" if HAS_ONNX else "pt2"]  # what is installed
    argv = ["pt2" if a == "onnx" else a for a in argv[1:]]
    assert main([*argv, "--batch-size", "3"]) == 0
    assert "model.pt2 (pt2" in capsys.readouterr().out
    from tdcompress.config import load_config
    from tdcompress.pipeline import Pipeline
    from tdcompress.train.checkpoint import load_checkpoint

    p = Pipeline(load_config(path))
    model = p.compressed_model()
    model.load_state_dict(load_checkpoint(p.out / "finetuned.pt", "cpu")["model"])
    assert any(type(m).__name__ == "TTLinear" for m in model.modules())
    x = torch.randn(3, *p.input_shape()[1:])
    got = torch.export.load(p.out / "model.pt2").module()(x)
    torch.testing.assert_close(got, _eager(model, x), rtol=1e-5, atol=1e-5)
    # the dense model, to a chosen file
    out = tmp_path / "dense.pt2"
    argv = ["export", str(path), "--format", "pt2", "--weights", "dense", "--output", str(out)]
    assert main(argv) == 0  # batch size 1: the graph is specialised to it
    with pytest.raises(AssertionError, match=r"x\.size\(\)\[0\] == 1"):
        torch.export.load(out).module()(x)
    assert main([*argv, "--batch-size", "3"]) == 0
    dense = p.dense_model()
    dense.load_state_dict(load_checkpoint(p.out / "dense.pt", "cpu")["model"])
    got = torch.export.load(out).module()(x)
    torch.testing.assert_close(got, _eager(dense, x), rtol=1e-5, atol=1e-5)
    # any batch size: the compressed model, planned for batch 4, run at 1 and 3
    out = tmp_path / "any.pt2"
    argv = ["export", str(path), "--format", "pt2", "--output", str(out), "--batch-size", "4"]
    assert main([*argv, "--dynamic-batch"]) == 0
    assert "input (N, " in capsys.readouterr().out
    for n in (1, 3):
        xn = torch.randn(n, *p.input_shape()[1:])
        got = torch.export.load(out).module()(xn)
        torch.testing.assert_close(got, _eager(model, xn), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        p.export(batch_size=0)
    import tdcompress.pipeline as pipeline_mod

    with pytest.MonkeyPatch.context() as mp:  # under torchrun each rank would write the file
        mp.setattr(pipeline_mod, "world_size", lambda: 2)
        with pytest.raises(
            RuntimeError, match=r"export runs in one process, not under torchrun \(2 ranks\)"
        ):
            p.export()
    with pytest.raises(ValueError, match=r"weights must be one of .*got 'admm'"):
        p.export(weights="admm")
    assert json.loads((p.out / "state.json").read_text())["done"]["finetune"]


def test_the_export_hint_names_a_format_that_is_installed(monkeypatch):
    import argparse
    import importlib.util

    from tdcompress.cli import _export_command

    args = argparse.Namespace(
        command="pipeline", config="c.yaml", set=[], data_root=None, out_dir=None
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m: None if m == "onnx" else real(m))
    hint = _export_command(args)
    assert hint.startswith("tdcompress export c.yaml --format pt2")
    assert "tdcompress[onnx]" in hint
