"""Accuracy of predicted labels (integers or strings), as an offline `evaluate` metric."""

import datasets
import evaluate

_DESCRIPTION = """
The share of predicted labels equal to their reference labels. Labels are integers (class ids, token ids) or
strings; predictions and references must use the same kind.
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int` or `str`): predicted labels.
    references (`list` of `int` or `str`): reference labels, one per prediction, of the same kind.
Returns:
    accuracy (`float`): correct / examples, in [0, 1].
    num_correct (`int`): number of correct predictions.
    num_examples (`int`): number of examples.
Example:
    >>> metric = evaluate.load("/abs/path/to/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])["accuracy"]
    0.75
"""


class Accuracy(evaluate.Metric):
    """Share of predicted labels equal to the references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def compute(self, **kwargs) -> dict | None:
        """Score everything added so far plus the inputs given here (see the inputs description)."""
        if self.writer is None and all(kwargs.get(name) is None for name in self._feature_names()):
            raise ValueError("Nothing to score: pass predictions and references to compute, or add_batch them first.")
        return super().compute(**kwargs)

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add one batch of predicted and reference labels (equal lengths, one kind)."""
        if predictions is not None and references is not None:
            if len(predictions) != len(references):
                raise ValueError(
                    f"predictions has {len(predictions)} labels but references has {len(references)}; "
                    "pass one reference per prediction."
                )
            kinds = {_label_kind(label) for label in [*predictions, *references]}
            if not kinds <= {"integer", "string"}:
                raise ValueError(f"Labels must be integers or strings, got {sorted(kinds)}; convert them first.")
            if len(kinds) > 1:
                raise ValueError(
                    f"Labels mix kinds {sorted(kinds)}; use integers for both predictions and references, "
                    "or strings for both."
                )
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references) -> dict:
        if len(predictions) == 0:
            raise ValueError("No examples to score: pass predictions and references (or add_batch them) first.")
        correct = sum(p == r for p, r in zip(predictions, references))
        return {"accuracy": correct / len(predictions), "num_correct": correct, "num_examples": len(predictions)}


def _label_kind(label) -> str:
    """'string' for text labels, 'integer' for int-like ones (Python, NumPy or 0-d tensor), else the type name."""
    if isinstance(label, str):
        return "string"
    if hasattr(label, "__index__"):
        return "integer"
    return type(label).__name__
