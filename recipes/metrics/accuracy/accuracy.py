"""Accuracy as an `evaluate` module that loads offline: `evaluate.load("recipes/metrics/accuracy")`."""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to the references."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy: the fraction of predictions equal to the references.",
            citation="",
            inputs_description="predictions and references: lists of class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float((predictions == references).mean()) if len(references) else 0.0}
