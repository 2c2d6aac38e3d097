"""RankAdaptor's performance model: a small MLP regressor (scikit-learn) from per-layer ranks and pruning statistics
to the quality after a short recovery run, with the log of the runs it learned from."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RUNS_NAME = "performance_runs.json"
MODEL_NAME = "performance_model.json"
INSTALL_HINT = 'pip install "hf_dpruner[recovery]"'


@dataclass
class RecoveryRun:
    """One measured short recovery run: the ranks, the per-layer pruning statistics and the score (lower is better,
    the log-perplexity on the recovery eval data)."""

    ranks: list[int]
    layer_stats: list[float]
    score: float
    meta: dict[str, Any] = field(default_factory=dict)  # model, sparsity, steps, ... (what the run was)


class PerformanceModel:
    """Predicts the score of a rank vector. Fitted on logged `RecoveryRun`s: offline ones (other models or
    sparsities of the same family, loaded with `from_pretrained`) and the online ones of the current search.

    Persistence is JSON only (no pickle): `save_pretrained` writes the runs and the regressor's settings, and
    `from_pretrained` refits deterministically (fixed seed), which takes milliseconds at this size.
    """

    def __init__(self, hidden_sizes: Sequence[int] = (32, 16), alpha: float = 1e-3, max_rank: int = 16,
                 seed: int = 0, runs: Sequence[RecoveryRun] = ()) -> None:
        self.hidden_sizes = tuple(hidden_sizes)
        self.alpha = float(alpha)
        self.max_rank = int(max_rank)
        self.seed = int(seed)
        self.runs: list[RecoveryRun] = list(runs)
        self._regressor = None
        self._target_mean, self._target_std = 0.0, 1.0

    def add_run(self, run: RecoveryRun) -> None:
        if self.runs and len(run.ranks) != len(self.runs[0].ranks):
            raise ValueError(
                f"A run with {len(run.ranks)} layers cannot join runs of {len(self.runs[0].ranks)} layers: the "
                "performance model is per model family (same number of decoder layers)."
            )
        self.runs.append(run)

    def features(self, ranks: Sequence[Sequence[int]], layer_stats: Sequence[float]) -> np.ndarray:
        """Rows ``[r_1/max_rank ... r_L/max_rank, stat_1 ... stat_L]``."""
        scaled = np.asarray(ranks, dtype=np.float64) / self.max_rank
        stats = np.broadcast_to(np.asarray(layer_stats, dtype=np.float64), (len(scaled), len(layer_stats)))
        return np.concatenate([scaled, stats], axis=1)

    def fit(self) -> PerformanceModel:
        if len(self.runs) < 2:
            raise ValueError(f"The performance model needs at least 2 runs to fit, it has {len(self.runs)}.")
        try:
            from sklearn.neural_network import MLPRegressor
        except ImportError as err:
            raise ImportError(f"RankAdaptor's performance model needs scikit-learn: {INSTALL_HINT}.") from err
        x = np.concatenate([self.features([r.ranks], r.layer_stats) for r in self.runs])
        y = np.asarray([r.score for r in self.runs], dtype=np.float64)
        self._target_mean, self._target_std = float(y.mean()), float(y.std()) or 1.0
        self._regressor = MLPRegressor(
            hidden_layer_sizes=self.hidden_sizes, alpha=self.alpha, solver="lbfgs", max_iter=5000,
            random_state=self.seed,
        ).fit(x, (y - self._target_mean) / self._target_std)
        return self

    def predict(self, ranks: Sequence[Sequence[int]], layer_stats: Sequence[float]) -> np.ndarray:
        """Predicted scores (lower is better) of rank vectors for a model with these per-layer statistics."""
        if self._regressor is None:
            raise ValueError("The performance model is not fitted: call fit() (it needs at least 2 runs).")
        return self._regressor.predict(self.features(ranks, layer_stats)) * self._target_std + self._target_mean

    def settings(self) -> dict[str, Any]:
        return {"regressor": "sklearn.neural_network.MLPRegressor", "hidden_sizes": list(self.hidden_sizes),
                "alpha": self.alpha, "max_rank": self.max_rank, "seed": self.seed}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``performance_runs.json`` (the training set) and ``performance_model.json`` (the settings)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name, payload in ((RUNS_NAME, [asdict(r) for r in self.runs]), (MODEL_NAME, self.settings())):
            partial = folder / f".{name}.partial"
            partial.write_text(json.dumps(payload, indent=2) + "\n")
            os.replace(partial, folder / name)
        return folder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, fit: bool = True) -> PerformanceModel:
        """Load the runs and settings written by `save_pretrained` (and refit, unless ``fit=False``)."""
        folder = Path(path)
        data = {}
        for name in (RUNS_NAME, MODEL_NAME):
            file = folder / name
            if not file.is_file():
                raise FileNotFoundError(f"No {name} in {folder}: save a performance model with save_pretrained().")
            try:
                data[name] = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{file} is not valid JSON ({err}); the file is corrupt.") from err
        settings = data[MODEL_NAME]
        try:
            runs = [RecoveryRun(**run) for run in data[RUNS_NAME]]
            model = cls(settings["hidden_sizes"], settings["alpha"], settings["max_rank"], settings["seed"])
        except (TypeError, KeyError) as err:
            raise ValueError(f"{folder} does not hold a valid performance model ({err}).") from err
        for run in runs:
            model.add_run(run)
        return model.fit() if fit and len(runs) >= 2 else model
