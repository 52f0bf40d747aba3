"""Evaluation: reconstruction and sparsity metrics, the model's loss with an SAE spliced in, baselines."""

from . import baselines
from .eval_report import pareto_frontier, write_report
from .evaluate import evaluate, evaluate_with_baselines, matched_k
from .metrics import ReconstructionMetrics, density_histogram
from .variant_records import is_causal_lm
from .whole_forward import activation_mean, evaluate_reference

__all__ = ["ReconstructionMetrics", "activation_mean", "baselines", "density_histogram", "evaluate",
           "evaluate_reference", "evaluate_with_baselines", "is_causal_lm", "matched_k", "pareto_frontier",
           "write_report"]
