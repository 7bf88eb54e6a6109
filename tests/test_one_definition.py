"""Every list of allowed values has one definition that every check reads; plan() takes the
compress section of a config; plan files name a solved target as plan()'s argument does."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml
from torch import nn

from tdcompress import admm, bench, cli, export, pipeline, planning, surgery
from tdcompress.config import CompressConfig, _choices, load_config
from tdcompress.formats import layouts
from tdcompress.planning import CompressionPlan, plan
from tdcompress.train import loop


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def test_config_checks_read_the_owners_definitions() -> None:
    got = _choices()
    assert got[("compress", "init")] is surgery.INITS
    assert got[("compress", "allocation")] is planning.ALLOCATIONS
    assert got[("admm", "mode")] is admm.MODES
    assert got[("runtime", "amp")] is loop.AMP_MODES
    with pytest.raises(ValueError, match=r"admm.mode must be one of \['penalty', 'hook'\]"):
        load_config(sets=["admm.mode=both"])
    with pytest.raises(ValueError, match=r"compress.allocation must be one of \['equal_rank'"):
        load_config(sets=["compress.allocation=equal"])


def test_the_library_checks_say_the_same() -> None:
    with pytest.raises(ValueError, match=r"mode must be 'penalty' or 'hook', got 'both'"):
        admm.ADMM(_mlp(), plan(_mlp(), "svd", ranks=4), mode="both")
    with pytest.raises(ValueError, match=r"init must be 'decompose' or 'random', got 'x'"):
        surgery.decompose(_mlp(), plan(_mlp(), "svd", ranks=4), init="x")
    with pytest.raises(ValueError, match=r"amp must be None, 'bf16' or 'fp16', got 'fp8'"):
        loop.autocast_context(torch.device("cpu"), "fp8")
    with pytest.raises(ValueError, match=r"layout must be 'matrix', 'channel' or 'garipov'"):
        layouts.tensor_shape("row", (2, 2), (2, 2))
    assert [x for v in layouts.LAYOUTS.values() for x in v] == ["matrix", "channel", "garipov"]


def test_cli_choices_are_the_library_definitions() -> None:
    parser = cli._parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def choices(command: str, option: str) -> list[str]:
        sp = subs.choices[command]
        return next(a.choices for a in sp._actions if option in a.option_strings)

    assert choices("export", "--format") == list(export.EXPORT_FORMATS)
    assert choices("export", "--weights") == list(pipeline.EXPORT_WEIGHTS)
    assert choices("bench", "--runtimes") == list(bench.RUNTIMES)
    assert choices("bench", "--weights") == list(bench.WEIGHTS)


@pytest.mark.parametrize(
    "section",
    [
        {"format": "svd", "ranks": 8, "exclude": ["2"]},
        {"format": "tt", "target_ratio": 4.0, "allocation": "equal_ratio"},
        {"format": "svd", "target_macs_reduction": 3.0, "overrides": {"0": {"ranks": 4}}},
    ],
    ids=["ranks", "ratio", "macs"],
)
def test_plan_takes_the_compress_section_of_a_config(section) -> None:
    shape = (1, 64)
    args = {k: v for k, v in section.items() if k != "format"}
    want = plan(_mlp(), section["format"], input_shape=shape, **args).to_dict()
    cfg = load_config(sets=[f"compress.{k}={v}" for k, v in section.items()]).compress
    assert isinstance(cfg, CompressConfig)
    assert plan(_mlp(), config=cfg, input_shape=shape).to_dict() == want
    assert plan(_mlp(), config=section, input_shape=shape).to_dict() == want
    # the other arguments still apply; the ones the config sets may be repeated unchanged
    assert plan(_mlp(), config=dict(section, init="random"), input_shape=shape).to_dict() == want


def test_plan_with_a_config_refuses_its_arguments_twice() -> None:
    with pytest.raises(ValueError, match=r"give \['ranks'\] either in config or as arguments"):
        plan(_mlp(), config={"format": "svd", "ranks": 8}, ranks=4)
    with pytest.raises(ValueError, match=r"give \['format'\] either"):
        plan(_mlp(), "tt", config={"format": "svd", "ranks": 8})
    with pytest.raises(ValueError, match=r"unknown compress config keys \['rank'\]"):
        plan(_mlp(), config={"format": "svd", "rank": 8})
    with pytest.raises(TypeError, match="config must be a CompressConfig or a mapping"):
        plan(_mlp(), config=["svd"])


@pytest.mark.parametrize(
    ("target", "key"),
    [
        ({"target_ratio": 4.0}, "target_ratio"),
        ({"target_macs_reduction": 3.0}, "target_macs_reduction"),
    ],
)
def test_plan_files_name_the_target_as_the_argument(tmp_path, target, key) -> None:
    p = plan(_mlp(), "svd", input_shape=(1, 64), **target)
    assert p.meta == {key: next(iter(target.values())), "allocation": "equal_rank"}
    p.save(tmp_path / "plan.yaml")
    assert CompressionPlan.load(tmp_path / "plan.yaml").meta == p.meta


def test_old_plan_files_with_target_mac_reduction_still_load(tmp_path) -> None:
    p = plan(_mlp(), "svd", target_macs_reduction=3.0, input_shape=(1, 64))
    old = p.to_dict()
    old["meta"] = {"target_mac_reduction": 3.0, "allocation": "equal_rank"}
    assert CompressionPlan.from_dict(old).meta == p.meta
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(old))
    got = CompressionPlan.load(tmp_path / "plan.yaml")
    assert got.meta == {"target_macs_reduction": 3.0, "allocation": "equal_rank"}
    assert got.to_dict() == p.to_dict()
