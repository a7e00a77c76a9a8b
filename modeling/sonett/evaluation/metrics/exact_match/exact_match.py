"""Exact match of predicted and reference strings, as an offline `evaluate` metric."""

import datasets
import evaluate

_DESCRIPTION = """
The share of predictions that equal their reference string exactly, after optional normalisation:
`strip` removes leading and trailing whitespace, `ignore_case` compares case-folded strings.
"""

_CITATION = """
@inproceedings{rajpurkar2016squad,
  title={{SQuAD}: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={Proceedings of EMNLP},
  pages={2383--2392},
  year={2016}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted strings.
    references (`list` of `str`): reference strings, one per prediction.
    strip (`bool`, default `True`): ignore leading and trailing whitespace.
    ignore_case (`bool`, default `False`): compare case-folded strings.
Returns:
    exact_match (`float`): matches / examples, in [0, 1].
    num_matches (`int`): number of exact matches.
    num_examples (`int`): number of examples.
Example:
    >>> metric = evaluate.load("/abs/path/to/exact_match")
    >>> metric.compute(predictions=["Paris ", "rome"], references=["Paris", "Rome"], ignore_case=True)["exact_match"]
    1.0
"""


class ExactMatch(evaluate.Metric):
    """Share of predictions equal to their references after optional stripping and case folding."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def compute(self, **kwargs) -> dict | None:
        """Score everything added so far plus the inputs given here (see the inputs description)."""
        if self.writer is None and all(kwargs.get(name) is None for name in self._feature_names()):
            raise ValueError("Nothing to score: pass predictions and references to compute, or add_batch them first.")
        return super().compute(**kwargs)

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add one batch of predicted and reference strings (equal lengths)."""
        if predictions is not None and references is not None and len(predictions) != len(references):
            raise ValueError(
                f"predictions has {len(predictions)} strings but references has {len(references)}; "
                "pass one reference per prediction."
            )
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, strip: bool = True, ignore_case: bool = False) -> dict:
        if len(predictions) == 0:
            raise ValueError("No examples to score: pass predictions and references (or add_batch them) first.")
        for name, column in (("predictions", predictions), ("references", references)):
            missing = [i for i, text in enumerate(column) if text is None]
            if missing:
                raise ValueError(f"{name}[{missing[0]}] is None; every {name[:-1]} must be a string.")

        def normalise(text: str) -> str:
            text = text.strip() if strip else text
            return text.casefold() if ignore_case else text

        matches = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references))
        return {"exact_match": matches / len(predictions), "num_matches": matches, "num_examples": len(predictions)}
