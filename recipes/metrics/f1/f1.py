"""F1 as an `evaluate` module that loads offline: `evaluate.load("recipes/metrics/f1")`."""

import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    """F1 of one positive class (`average="binary"`) or the unweighted mean over classes (`"macro"`)."""

    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score: harmonic mean of precision and recall.",
            citation="",
            inputs_description="predictions and references: lists of class ids; average: 'binary' or 'macro'.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        predictions, references = np.asarray(predictions), np.asarray(references)
        classes = [pos_label] if average == "binary" else sorted(set(references) | set(predictions))
        scores = []
        for c in classes:
            tp = np.sum((predictions == c) & (references == c))
            fp = np.sum((predictions == c) & (references != c))
            fn = np.sum((predictions != c) & (references == c))
            scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return {"f1": float(np.mean(scores))}
