"""Step costs learnt from the steps a serving cluster actually runs (the real cluster's `StepCost`).

A forward pass costs about `fixed + a * prefill tokens + b * prefill context + c * decodes + d *
decode context` seconds (the simulator's cost models have the same inputs). Each instance keeps
the least-squares sufficient statistics of its own steps, decayed so that the fit follows the
present (`StepStats`); the controller adds every instance's up, since one instance alone may never
see some kinds of step (a prefill instance never decodes), and solves once per monitor tick. Until
enough steps are seen the cost is zero everywhere, which makes the adaptive router take the
paper's way (remote prefill) for every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NUM_FEATURES = 5  # 1, prefill tokens, prefill context, decodes, decode context
# Feature scales keep the normal equations well conditioned (tokens in thousands).
_SCALE = (1.0, 1e-3, 1e-6, 1e-2, 1e-6)
_RIDGE = 1e-9


def _features(prefill_tokens: int, prefill_context: int, decode_seqs: int, decode_context: int) -> tuple[float, ...]:
    raw = (1.0, prefill_tokens, prefill_context, decode_seqs, decode_context)
    return tuple(x * s for x, s in zip(raw, _SCALE))


@dataclass
class StepStats:
    """Decayed sums of x x^T and x y over observed steps (x: features, y: seconds), flattened so
    they travel in a message: `xtx` row-major (5 x 5), then `xty` (5), then the step count."""

    decay: float = 0.995
    xtx: list[float] = field(default_factory=lambda: [0.0] * NUM_FEATURES * NUM_FEATURES)
    xty: list[float] = field(default_factory=lambda: [0.0] * NUM_FEATURES)
    count: float = 0.0

    def observe(self, seconds: float, prefill_tokens: int, prefill_context: int, decode_seqs: int,
                decode_context: int) -> None:
        x = _features(prefill_tokens, prefill_context, decode_seqs, decode_context)
        d = self.decay
        for i in range(NUM_FEATURES):
            self.xty[i] = d * self.xty[i] + x[i] * seconds
            row = i * NUM_FEATURES
            for j in range(NUM_FEATURES):
                self.xtx[row + j] = d * self.xtx[row + j] + x[i] * x[j]
        self.count = d * self.count + 1.0

    def to_list(self) -> list[float]:
        return [*self.xtx, *self.xty, self.count]

    @classmethod
    def from_list(cls, values: list[float]) -> "StepStats":
        n = NUM_FEATURES * NUM_FEATURES
        if len(values) != n + NUM_FEATURES + 1:
            raise ValueError(f"step stats need {n + NUM_FEATURES + 1} values, got {len(values)}")
        return cls(xtx=list(values[:n]), xty=list(values[n:n + NUM_FEATURES]), count=values[-1])


@dataclass(frozen=True)
class LinearStepCost:
    """`step_time` from fitted coefficients (seconds per unit of each feature, unscaled)."""

    coefficients: tuple[float, ...] = (0.0,) * NUM_FEATURES

    @property
    def fitted(self) -> bool:
        """False until enough steps were seen (every cost is then 0)."""
        return any(self.coefficients)

    def step_time(self, prefill_tokens: int, prefill_context: int, decode_seqs: int, decode_context: int) -> float:
        raw = (1.0, prefill_tokens, prefill_context, decode_seqs, decode_context)
        return max(0.0, sum(c * x for c, x in zip(self.coefficients, raw)))

    @classmethod
    def fit(cls, stats: list[StepStats], min_steps: float = 20.0) -> "LinearStepCost":
        """Least squares over the sum of `stats` (ridge-regularised: a feature no step varied gets
        ~0); zero cost while fewer than `min_steps` steps were seen."""
        xtx = [sum(s.xtx[k] for s in stats) for k in range(NUM_FEATURES * NUM_FEATURES)]
        xty = [sum(s.xty[k] for s in stats) for k in range(NUM_FEATURES)]
        if sum(s.count for s in stats) < min_steps:
            return cls()
        scaled = _solve([[xtx[i * NUM_FEATURES + j] + (_RIDGE if i == j else 0.0) for j in range(NUM_FEATURES)]
                         for i in range(NUM_FEATURES)], xty)
        # Negative marginal costs are noise (or collinear features): a step never gets cheaper with more work.
        return cls(tuple(max(0.0, w) * s for w, s in zip(scaled, _SCALE)))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (5 x 5: no numpy needed)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            continue
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] if abs(m[i][i]) >= 1e-300 else 0.0 for i in range(n)]
