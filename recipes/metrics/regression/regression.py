"""Regression scores as an `evaluate` module that loads offline: `evaluate.load("recipes/metrics/regression")`."""

import datasets
import evaluate
import numpy as np
from scipy import stats


class Regression(evaluate.Metric):
    """Mean squared error, Pearson and Spearman correlation of predictions with references (STS-B style)."""

    def _info(self):
        return evaluate.MetricInfo(
            description="MSE, Pearson r and Spearman rho between predicted and reference scores.",
            citation="",
            inputs_description="predictions and references: lists of floats.",
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions, float), np.asarray(references, float)
        constant = np.ptp(predictions) == 0 or np.ptp(references) == 0  # correlation undefined: report 0
        return {
            "mse": float(np.mean((predictions - references) ** 2)),
            "pearson": 0.0 if constant else float(stats.pearsonr(predictions, references)[0]),
            "spearmanr": 0.0 if constant else float(stats.spearmanr(predictions, references)[0]),
        }
