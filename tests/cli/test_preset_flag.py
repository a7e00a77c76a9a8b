"""Every command that builds a model from a preset takes it as `--config NAME`, as `sonett train` does; `sonett
benchmark` keeps `--preset` as well."""

import pytest

from sonett.cli import benchmark, train


@pytest.mark.parametrize("flag", ["--config", "--preset"])
def test_benchmark_takes_the_preset_as_config_like_train(flag):
    assert benchmark.build_parser().parse_args([flag, "sonett-tiny"]).preset == "sonett-tiny"
    (args,) = train.build_parser().parse_args_into_dataclasses(args=["--config", "sonett-tiny"])
    assert args.config == "sonett-tiny"
