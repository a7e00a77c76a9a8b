"""An embedded instruction set with verifiable answers, generated in code so fine-tuning needs no download.

Seven tasks, each answer computable from the question:

- `arithmetic`: one-step word problems (+, -, *, /) answered with the calculation, e.g. `7 + 5 = 12`;
- `reverse`, `sort`, `count`: reverse / alphabetically sort / count a short comma-separated word list;
- `module_of`, `summary`, `signature`: questions about public functions of standard-library modules, answered
  from `inspect`: the defining module, the first line of the docstring, the parameter list.

Records use the instruction format (`instruction`, `input`, `output`, plus `task`). The arithmetic and list tasks
depend only on the seed; the standard-library tasks also on the Python version that runs the generator.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import random
from collections import Counter
from collections.abc import Callable

from sonett.extras import requires_extra

with requires_extra("train"):
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

Record = dict[str, str]

WORDS = (
    "apple", "bird", "boat", "bread", "chair", "cloud", "coin", "desk", "door", "dream", "field", "fish", "flower",
    "forest", "garden", "glass", "grape", "hill", "horse", "house", "island", "lake", "lamp", "leaf", "lemon",
    "letter", "moon", "mountain", "music", "ocean", "orange", "paper", "pencil", "piano", "plant", "rain", "river",
    "road", "rock", "rose", "salt", "sand", "ship", "shoe", "snow", "song", "star", "stone", "storm", "sugar",
    "table", "tiger", "tower", "train", "tree", "valley", "wall", "water", "whale", "window", "winter", "wolf",
)  # fmt: skip
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Ida", "Jonas", "Kira", "Leo")
ITEMS = ("apples", "books", "coins", "pencils", "stamps", "marbles", "shells", "cards", "cookies", "stickers")
STDLIB_MODULES = (
    "base64", "binascii", "bisect", "calendar", "copy", "difflib", "fnmatch", "functools", "glob", "heapq",
    "html", "json", "keyword", "math", "operator", "os.path", "random", "re", "shutil", "statistics", "string",
    "textwrap", "zlib",
)  # fmt: skip
# Examples per generated task; the standard-library tasks take at most this many functions each.
TASK_SIZES = {"arithmetic": 320, "reverse": 160, "sort": 160, "count": 120, "stdlib": 160}
MAX_SUMMARY_CHARS = 100


def arithmetic_problem(rng: random.Random) -> Record:
    """A one-step word problem; the answer shows the calculation."""
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    operation = rng.choice("+-*/")
    if operation == "+":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        question, answer = f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?", a + b
    elif operation == "-":
        a = rng.randint(5, 30)
        b = rng.randint(1, a - 1)
        question, answer = f"{name} has {a} {items} and gives {b} away. How many {items} are left?", a - b
    elif operation == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question, answer = f"There are {a} boxes with {b} {items} in each. How many {items} are there?", a * b
    else:
        answer, b = rng.randint(2, 9), rng.randint(2, 9)
        a = answer * b
        question = f"{name} shares {a} {items} equally among {b} friends. How many {items} does each friend get?"
    return {"instruction": question, "input": "", "output": f"{a} {operation} {b} = {answer}", "task": "arithmetic"}


def word_list_task(rng: random.Random, task: str) -> Record:
    """Reverse, sort or count a comma-separated list of 2-8 distinct words."""
    words = rng.sample(WORDS, rng.randint(2, 8))
    if task == "reverse":
        instruction, output = "Reverse the order of these words.", ", ".join(reversed(words))
    elif task == "sort":
        instruction, output = "Sort these words alphabetically.", ", ".join(sorted(words))
    elif task == "count":
        instruction, output = "How many words are in this list?", str(len(words))
    else:
        raise ValueError(f"Unknown word-list task {task!r}; use 'reverse', 'sort' or 'count'.")
    return {"instruction": instruction, "input": ", ".join(words), "output": output, "task": task}


def stdlib_functions() -> list[tuple[str, str, Callable]]:
    """(module name, function name, function) for the documented public functions of `STDLIB_MODULES`."""
    found = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in inspect.getmembers(module, inspect.isroutine):
            if not name.startswith("_") and inspect.getdoc(obj):
                found.append((module_name, name, obj))
    return found


def docstring_summary(function: Callable, name: str) -> str | None:
    """The first docstring line, or None when it is a signature line or too long to be a one-line answer."""
    first = inspect.getdoc(function).strip().splitlines()[0].strip()
    if first.startswith(name + "(") or len(first) > MAX_SUMMARY_CHARS:
        return None
    return first


def parameter_list(function: Callable) -> str | None:
    """`a, b=2, *args` for a function with an introspectable signature, else None."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    text = str(signature.replace(return_annotation=inspect.Signature.empty))[1:-1]
    return text or None


def stdlib_records(rng: random.Random, limit: int) -> list[Record]:
    """Questions about standard-library functions: defining module, one-line summary, parameters."""
    functions = stdlib_functions()
    name_counts = Counter(name for _, name, _ in functions)
    module_of, summary, signature = [], [], []
    for module_name, name, function in functions:
        qualified = f"{module_name}.{name}"
        if name_counts[name] == 1:  # a name several modules define has no single answer
            module_of.append(
                {
                    "instruction": f"Which standard-library module provides the function `{name}`?",
                    "input": "",
                    "output": module_name,
                    "task": "module_of",
                }
            )
        if (line := docstring_summary(function, name)) is not None:
            summary.append(
                {
                    "instruction": f"What does `{qualified}` do? Answer in one line.",
                    "input": "",
                    "output": line,
                    "task": "summary",
                }
            )
        if (params := parameter_list(function)) is not None:
            signature.append(
                {
                    "instruction": f"List the parameters of `{qualified}`.",
                    "input": "",
                    "output": params,
                    "task": "signature",
                }
            )
    return [record for group in (module_of, summary, signature) for record in rng.sample(group, min(limit, len(group)))]


def instruction_records(seed: int = 0) -> list[Record]:
    """Every embedded example, deduplicated on (instruction, input), in a seeded order."""
    rng = random.Random(seed)
    records = [arithmetic_problem(rng) for _ in range(TASK_SIZES["arithmetic"])]
    for task in ("reverse", "sort", "count"):
        records += [word_list_task(rng, task) for _ in range(TASK_SIZES[task])]
    records += stdlib_records(rng, TASK_SIZES["stdlib"])
    unique = list({(r["instruction"], r["input"]): r for r in records}.values())
    rng.shuffle(unique)
    return unique


def default_instruction_splits(validation_size: int = 200, seed: int = 0) -> DatasetDict:
    """The embedded set as `train` / `validation` Datasets with columns instruction, input, output, task.

    No (instruction, input) pair occurs in both splits.
    """
    records = instruction_records(seed)
    if not 0 < validation_size < len(records):
        raise ValueError(f"validation_size must be between 1 and {len(records) - 1}, got {validation_size}.")
    logger.info("embedded instruction set: %d examples, %d held out", len(records), validation_size)
    return DatasetDict(
        train=Dataset.from_list(records[validation_size:]),
        validation=Dataset.from_list(records[:validation_size]),
    )


__all__ = ["TASK_SIZES", "default_instruction_splits", "instruction_records"]
