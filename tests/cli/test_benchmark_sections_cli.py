"""`sonett benchmark`'s flags: the default run gives the issue's rows (sections, training presets and contexts),
bad flags exit 2 naming the fix, and one plot per section is named from the `--plot` prefix."""

from pathlib import Path

import pytest

from sonett.cli import benchmark


def parse(*argv):
    return benchmark.build_parser().parse_args(list(argv))


def test_the_default_run_gives_the_issues_rows():
    args = parse()
    assert args.sections == ["train", "prefill", "decode"]
    assert args.preset == "sonett-tiny-constant" and args.contexts == [1024, 4096, 16384, 32768]
    # sonett-tiny at 512 and 4k, the hourglass at 4k, the width-512 preset at 512
    rows = [(preset, context) for preset, contexts in args.train_presets for context in contexts or args.train_contexts]
    assert rows == [("sonett-tiny", 512), ("sonett-tiny", 4096), ("sonett-tiny-hourglass", 4096), ("sonett-mini", 512)]
    assert args.train_batch is None and args.repeats == 3 and args.decode_modes == ["eager", "compiled"]


def test_sections_and_training_presets_parse():
    args = parse("--sections", "decode", "train", "--train-presets", "sonett-small@256,1024", "x/y.json")
    assert args.sections == ["decode", "train"]
    assert args.train_presets == [("sonett-small", [256, 1024]), ("x/y.json", None)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "speed"], "invalid choice: 'speed'"),
        (["--train_presets", "sonett-tiny@big"], "sonett-tiny@512,4096"),
        (["--train_presets", "@512"], "names no preset"),
        (["--contexts", "0"], "must be a positive integer"),
        (["--decode_modes", "jit"], "invalid choice: 'jit'"),
    ],
)
def test_bad_flags_exit_2_naming_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_preset_is_refused_before_anything_is_measured(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--sections", "train", "--train_presets", "sonett-huge"])
    assert exit_info.value.code == 2 and "No preset 'sonett-huge'" in capsys.readouterr().err


def test_one_plot_per_section_from_the_prefix():
    assert benchmark.plot_path(Path("runs/benchmark"), "train") == Path("runs/benchmark-train.png")
    assert benchmark.plot_path(Path("docs/benchmark.png"), "decode") == Path("docs/benchmark-decode.png")


def test_a_run_prints_the_tables_and_writes_the_plots_and_json(tmp_path, capsys):
    import json

    from sonett.presets import load_preset

    preset = load_preset("sonett-tiny")
    preset.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(preset))
    argv = ["--sections", "train", "decode", "--preset", str(path), "--contexts", "16", "--train_presets"]
    argv += [f"{path}@16", "--repeats", "1", "--decode_tokens", "1", "--decode_modes", "eager"]
    benchmark.main([*argv, "--plot", str(tmp_path / "bench"), "--json", str(tmp_path / "rows.json")])
    output = capsys.readouterr().out
    assert "fp32 matmul peak:" in output and "| Sonett / Llama |" in output and "speed-up eager" in output
    results = json.loads((tmp_path / "rows.json").read_text())
    assert results["peak_flops"] > 0 and len(results["train"]) == 2 and len(results["decode"]) == 2
    assert results["prefill"] == []
    assert sorted(p.name for p in tmp_path.glob("bench-*.png")) == ["bench-decode.png", "bench-train.png"]
