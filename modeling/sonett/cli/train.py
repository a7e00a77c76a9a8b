"""Pretrain a Sonett preset with Accelerate, write a Hub-ready folder, reload it and generate a sample.

With no flags this is `make demo`: the tiny preset on the Python standard library's own source. Every field of
`sonett.training.pretraining.PretrainArguments` is a flag, e.g.

    sonett train --config sonett-small --data_files corpus.jsonl --max_steps 20000
    sonett train --data_files big/*.jsonl --streaming --checkpointing_steps 1000 --checkpoints_total_limit 3
    sonett train ... --resume_from_checkpoint latest          # continues the same data order
    sonett train ... --resume_from_checkpoint latest --allow_changed_inputs  # preset/data edited since
    sonett train ... --nan_policy stop                        # raise at a NaN/inf step (default: skip it)
    accelerate launch --config_file configuration/accelerate/multi_gpu.yaml -m sonett train --config sonett-small
    accelerate launch --config_file configuration/accelerate/cpu_two_processes.yaml -m sonett train --cpu

`sonett train vision` runs the vision recipe instead (`sonett.training.vision.VisionArguments`; see
`sonett train vision --help`): it teaches a trained text model (default `runs/sonett-tiny`, from `make demo`) to
name digits and answer questions about shapes, and writes a multimodal folder and a picture grid of held-out
predictions.

Ctrl-C (SIGINT) or SIGTERM during training saves a checkpoint of the current step and exits with status 130 or 143
(128 + the signal number); rerun the same command with `--resume_from_checkpoint latest` to continue exactly.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

from sonett.cli.parsing import dataclass_parser, spellings
from sonett.extras import requires_extra
from sonett.hub.loading import load_model, load_tokenizer
from sonett.training.pretraining import (
    CHECKPOINTS_DIR,
    PretrainArguments,
    TrainingInterrupted,
    list_checkpoints,
    pretrain,
)

SAMPLE_PROMPT = "def read_config(path):\n    "
VISION_DESCRIPTION = """Teach a trained text Sonett to see: upgrade the folder with an image encoder and gated
cross-attention, train on embedded digits and shapes (no download), and write a multimodal folder that loads with
AutoModelForImageTextToText / AutoProcessor, plus a picture grid of held-out predictions.

    sonett train vision --text_model runs/sonett-tiny --plot docs/vision-samples.png
"""


def build_parser():
    """The parser of `sonett train` (every field of `PretrainArguments`)."""
    return dataclass_parser(PretrainArguments, "train", __doc__)


def build_vision_parser():
    """The parser of `sonett train vision` (every field of `VisionArguments`, and --plot)."""
    from sonett.training.vision import VisionArguments

    parser = dataclass_parser(VisionArguments, "train vision", VISION_DESCRIPTION)
    parser.add_argument(
        *spellings("plot"), default=None, help="PNG of held-out predictions (default: <output_dir>/samples.png)"
    )
    return parser


# `sonett train NAME ...`: the recipes that take the place of pretraining, each with its own flags.
SUBCOMMANDS = {"vision": build_vision_parser}


def generate_sample(folder: str, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 60) -> str:
    """Reload `folder` through the Auto classes (the sonett package's registered classes) and greedily continue
    `prompt`."""
    tokenizer = load_tokenizer(folder)
    model = load_model(folder).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def plot_samples(samples: list[dict], path: str) -> None:
    """A grid of held-out images with the question, the model's answer and whether it is right."""
    with requires_extra("train"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = (len(samples) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows))
    for axis, sample in zip(axes.flat, samples):
        axis.imshow(sample["image"])
        right = sample["prediction"] == sample["answer"]
        axis.set_title(
            f"{sample['question']}\n-> {sample['prediction']!r} ({'right' if right else 'want ' + sample['answer']})",
            fontsize=8,
            color="darkgreen" if right else "darkred",
        )
        axis.axis("off")
    for axis in list(axes.flat)[len(samples) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def vision_main(argv: list[str]) -> None:
    from sonett.training.vision import train_vision

    args, extra = build_vision_parser().parse_args_into_dataclasses(args=argv)
    results = train_vision(args)
    plot = extra.plot or os.path.join(args.output_dir, "samples.png")
    plot_samples(results["samples"], plot)
    print(f"\ntrainable parameters:  {results['trainable_parameters']:,} of {results['parameters']:,}")
    print(f"steps:                 {results['steps']}")
    print(f"digit naming accuracy: {results['digits_accuracy']:.2%} ({results['digits_test_images']} held-out images)")
    print(
        f"shape QA accuracy:     {results['shapes_accuracy']:.2%} ({results['shapes_test_questions']} held-out "
        "questions)"
    )
    for name, accuracy in results["shapes_accuracy_by_type"].items():
        print(f"  {name + ':':21s}{accuracy:.2%}")
    if results["encoder_stage"]:
        stage = results["encoder_stage"]
        accuracies = ", ".join(f"{name} {value:.2%}" for name, value in stage["held_out_accuracy"].items())
        print(f"encoder stage:         {stage['steps']} steps, held-out annotations: {accuracies}")
    print(f"wall time:             {results['wall_time_s']:.0f} s")
    print(f"model folder:          {args.output_dir}")
    print(f"samples:               {plot}")


def shut_down_process_group() -> None:
    """Tear down the process group of an `accelerate launch` run before exit, once every process is done.

    Left to interpreter shutdown, gloo's threads now and then die with "terminate called without an active
    exception" (SIGABRT), which fails the launch although training finished.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["vision"]:
        return vision_main(argv[1:])
    (args,) = build_parser().parse_args_into_dataclasses(args=argv)
    started = time.perf_counter()
    try:
        results = pretrain(args)
    except TrainingInterrupted as stopped:  # the library logged where the checkpoint is and how to resume
        shut_down_process_group()
        return stopped.exit_code
    shut_down_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    sample = generate_sample(args.output_dir)
    print(f"\nparameters:            {results['parameters']:,}")
    print(f"steps x tokens:        {results['steps']} x {results['batch_tokens']} = {results['tokens_seen']:,}")
    if "resumed_from" in results:
        print(f"resumed from:          {results['resumed_from']}")
    print(f"training throughput:   {results['train_tokens_per_second']:,.0f} tokens/s ({results['hardware']})")
    print(f"validation loss:       {results['validation_loss']:.4f}")
    print(f"validation perplexity: {results['validation_perplexity']:.2f} ({results['validation_tokens']:,} tokens)")
    print(f"wall time:             {time.perf_counter() - started:.0f} s")
    print(f"model folder:          {args.output_dir}")
    checkpoints = list_checkpoints(os.path.join(args.output_dir, CHECKPOINTS_DIR))
    if checkpoints:
        print(f"checkpoints:           {', '.join(p.name for p in checkpoints)} in {checkpoints[0].parent}")
    print("\nsample (reloaded with AutoModelForCausalLM.from_pretrained):")
    print(sample)


if __name__ == "__main__":
    sys.exit(main())
