"""Perplexity from summed negative log-likelihoods, as an `evaluate` metric that needs no model.

Load it offline with `evaluate.load(sonett.evaluation.scoring.metric_path("perplexity"))` (or the folder's absolute
path). The caller runs the model; this module only aggregates what it measured.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
Perplexity of a language model from per-sequence results: for each sequence, the summed negative
log-likelihood (natural log) of its predicted tokens and how many tokens were predicted. Corpus perplexity is
exp(sum of nll / sum of tokens), which weights every token equally; mean perplexity is the mean over sequences
of exp(nll_i / num_tokens_i), which weights every sequence equally. The model is never loaded here.
"""

_CITATION = """
@article{jelinek1977perplexity,
  title={Perplexity--a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L and Bahl, Lalit R and Baker, James K},
  journal={The Journal of the Acoustical Society of America},
  volume={62},
  number={S1},
  pages={S63--S63},
  year={1977}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list` of `float`): summed negative log-likelihood (nats) of each sequence's predicted tokens; finite, >= 0.
    num_tokens (`list` of `int`): number of predicted tokens in each sequence; > 0.
Returns:
    perplexity (`float`): exp(sum(nll) / sum(num_tokens)).
    loss (`float`): sum(nll) / sum(num_tokens), the mean negative log-likelihood per token.
    mean_perplexity (`float`): mean of the per-sequence perplexities.
    perplexities (`list` of `float`): exp(nll_i / num_tokens_i) for each sequence.
    num_tokens (`int`): total predicted tokens.
    num_sequences (`int`): number of sequences.
Example:
    >>> metric = evaluate.load("/abs/path/to/perplexity")
    >>> metric.compute(nll=[2.0, 6.0], num_tokens=[2, 2])["perplexity"]  # exp(8 / 4)
    7.38905609893065
"""


class Perplexity(evaluate.Metric):
    """Corpus and per-sequence perplexity from summed NLLs and token counts."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def compute(self, **kwargs) -> dict | None:
        """Score everything added so far plus the inputs given here (see the inputs description)."""
        if self.writer is None and all(kwargs.get(name) is None for name in self._feature_names()):
            raise ValueError("Nothing to score: pass nll and num_tokens to compute, or add_batch them first.")
        return super().compute(**kwargs)

    def add_batch(self, *, nll=None, num_tokens=None, **kwargs) -> None:
        """Add one batch of sequences (`nll` and `num_tokens` of equal length)."""
        if nll is not None and num_tokens is not None and len(nll) != len(num_tokens):
            raise ValueError(
                f"nll has {len(nll)} values but num_tokens has {len(num_tokens)}; pass one of each per sequence."
            )
        for index, count in enumerate(num_tokens if num_tokens is not None else []):
            if isinstance(count, bool) or not hasattr(count, "__index__"):
                raise ValueError(f"num_tokens[{index}] is {count!r}; token counts must be integers.")
        super().add_batch(nll=nll, num_tokens=num_tokens, **kwargs)

    def _compute(self, nll, num_tokens) -> dict:
        if len(nll) == 0:
            raise ValueError("No sequences to score: pass nll and num_tokens (or add_batch them) before compute.")
        for index, (value, count) in enumerate(zip(nll, num_tokens)):
            if value is None or not math.isfinite(value):
                raise ValueError(f"nll[{index}] is {value}; every nll must be finite (check the model's loss).")
            if value < 0:
                raise ValueError(f"nll[{index}] is {value} < 0; a negative log-likelihood cannot be negative.")
            if count is None or count <= 0:
                raise ValueError(f"num_tokens[{index}] is {count}; every sequence must predict at least one token.")
        total_nll = math.fsum(nll)
        total_tokens = sum(num_tokens)
        perplexities = [math.exp(value / count) for value, count in zip(nll, num_tokens)]
        return {
            "perplexity": math.exp(total_nll / total_tokens),
            "loss": total_nll / total_tokens,
            "mean_perplexity": math.fsum(perplexities) / len(perplexities),
            "perplexities": perplexities,
            "num_tokens": total_tokens,
            "num_sequences": len(perplexities),
        }
