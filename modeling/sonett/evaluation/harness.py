"""EleutherAI's lm-evaluation-harness on a model folder, with tasks written from local data (no Hub access).

`write_task` writes one harness task (a YAML config beside its JSON-lines data) into a folder that
`lm_eval.tasks.TaskManager(include_path=folder)` reads. `stdlib_tasks` writes two tasks from the documents that
pretraining held out of the embedded standard-library corpus (the split of `sonett.data.corpus.split_by_document`):

- `stdlib_next_line` (multiple choice, metrics `acc` and `acc_norm`): after a few lines of a held-out file, pick
  the line that really comes next among it and three lines drawn from other held-out files (chance 0.25);
- `stdlib_line_completion` (generate until the end of the line, metric `exact_match`): after a few lines and the
  first part of a line, write the rest of that line exactly.

`run_harness` runs `lm_eval.simple_evaluate` with the `hf` backend, so a Sonett folder and a transformers Llama
folder are scored by the same code. The folder is checked first and loaded with `trust_remote_code=False`: the
`sonett` package's registered classes load it and none of its code runs (`sonett.hub.loading`). lm-eval is an
optional dependency (the `eval` extra).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from sonett.data.corpus import split_by_document, stdlib_corpus
from sonett.extras import requires_extra
from sonett.hub.loading import check_model_folder

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("multiple_choice", "generate_until")
STDLIB_TASKS = ("stdlib_next_line", "stdlib_line_completion")
MIN_LINE_CHARS = 12  # lines shorter than this (after stripping) are too easy or too ambiguous to ask about


def write_task(
    directory: str | Path,
    name: str,
    docs: list[dict[str, Any]],
    output_type: str,
    until: list[str] | None = None,
    max_gen_toks: int = 32,
) -> Path:
    """Write the harness task `name` as `<directory>/<name>.yaml` with its data in `<directory>/<name>.jsonl`.

    Args:
        docs: for `multiple_choice`, dicts with `context` (str), `choices` (list of str, each scored as the text
            right after the context: put any separator in the choices) and `label` (index of the right choice);
            for `generate_until`, dicts with `context` and `target` (the exact text the greedy output must equal).
        output_type: `multiple_choice` (metrics acc, acc_norm) or `generate_until` (metric exact_match).
        until: generate_until only: stop strings (default: a newline); the output is cut at the first one.
        max_gen_toks: generate_until only: the most tokens generated per document.

    Returns:
        The path of the YAML file.
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    fields = {"context", "choices", "label"} if output_type == "multiple_choice" else {"context", "target"}
    for index, doc in enumerate(docs):
        if not fields <= set(doc):
            raise ValueError(f"Task {name!r} doc {index} lacks {sorted(fields - set(doc))}; {output_type} docs need "
                             f"{sorted(fields)}.")  # fmt: skip
    if not docs:
        raise ValueError(f"Task {name!r} has no docs.")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": output_type,
        "doc_to_text": "context",  # column names: the harness reads the values as they are, no template
        "doc_to_target": "label" if output_type == "multiple_choice" else "target",
        "target_delimiter": "",
    }
    if output_type == "multiple_choice":
        config["doc_to_choice"] = "choices"
        config["metric_list"] = [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in ("acc", "acc_norm")
        ]
    else:
        config["generation_kwargs"] = {"until": until or ["\n"], "do_sample": False, "max_gen_toks": max_gen_toks}
        config["metric_list"] = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return path


def _questions(lines: list[str], context_lines: int) -> list[int]:
    """Indices of the lines of one file worth asking about: long enough, with `context_lines` lines before them."""
    return [i for i in range(context_lines, len(lines)) if len(lines[i].strip()) >= MIN_LINE_CHARS]


def stdlib_tasks(
    directory: str | Path,
    examples: int = 200,
    context_lines: int = 8,
    validation_fraction: float = 0.02,
    max_documents: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Write `stdlib_next_line` and `stdlib_line_completion` from the held-out standard-library files.

    `validation_fraction` and `max_documents` must be those of the pretraining run, so that no question comes from a
    file the model trained on. Returns the task names.
    """
    corpus = stdlib_corpus(max_documents)
    held_out = split_by_document(corpus, validation_fraction, key="path")["validation"]
    files = [text.split("\n") for text in held_out["text"]]
    pool = [(f, i) for f, lines in enumerate(files) for i in _questions(lines, context_lines)]
    if len({f for f, _ in pool}) < 2:
        raise ValueError(f"The held-out split has {len(files)} files and {len(pool)} usable lines; raise "
                         f"validation_fraction or max_documents.")  # fmt: skip
    rng = random.Random(seed)
    next_line, completion = [], []
    for f, i in rng.sample(pool, min(examples, len(pool))):
        lines = files[f]
        context = "\n".join(lines[i - context_lines : i]) + "\n"
        truth = lines[i]
        distractors: list[str] = []
        while len(distractors) < 3:
            other, j = pool[rng.randrange(len(pool))]
            if other != f and lines[i].strip() != files[other][j].strip() and files[other][j] not in distractors:
                distractors.append(files[other][j])
        choices = [truth, *distractors]
        rng.shuffle(choices)
        next_line.append({"context": context, "choices": choices, "label": choices.index(truth)})
        # Cut the line before a space in its middle part, so the prompt ends on a token boundary.
        indent = len(truth) - len(truth.lstrip())
        spaces = [k for k, char in enumerate(truth) if char == " " and indent < k < len(truth) - 1]
        if spaces:
            cut = min(spaces, key=lambda k: abs(k - (indent + len(truth)) / 2))
            completion.append({"context": context + truth[:cut], "target": truth[cut:]})
    write_task(directory, STDLIB_TASKS[0], next_line, "multiple_choice")
    write_task(directory, STDLIB_TASKS[1], completion, "generate_until", until=["\n"], max_gen_toks=48)
    logger.info(
        "wrote %d next-line and %d line-completion questions from %d held-out files to %s",
        len(next_line),
        len(completion),
        len(files),
        directory,
    )
    return list(STDLIB_TASKS)


def run_harness(
    model: str | Path,
    tasks: list[str],
    include_path: str | Path,
    batch_size: int = 8,
    device: str = "cpu",
    limit: int | None = None,
    log_samples: bool = False,
    dtype: str = "float32",
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` with the `hf` backend on the folder `model` and the tasks in `include_path`.

    Returns the harness's result dict: `results[task]` holds the metrics (e.g. `acc,none`), and with `log_samples`
    `samples[task]` holds each document's requests and responses.
    """
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a saved model folder.")
    check_model_folder(folder)

    with requires_extra("eval"):
        import lm_eval
        from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder.resolve()), "trust_remote_code": False, "dtype": dtype},
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=log_samples,
    )


__all__ = ["STDLIB_TASKS", "run_harness", "stdlib_tasks", "write_task"]
