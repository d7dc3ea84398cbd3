"""Routing fidelity: are recorded routes what the model would choose, and how fragile are its choices?

- `replay(model, run)`: force a run's recorded routes (a capture, or a vLLM / SGLang import) on the model
  and measure per layer how often its own top-k agrees, and what the forced routes do to the next-token
  distribution and the loss.
- `stability(model, data, vary=...)`: the same tokens under other dtypes, batch sizes, experts
  implementations or devices; per layer the share of flipped decisions, first flips told apart from
  inherited ones, and the flip rate against each decision's router margin.

torch loads on first use, so `workbench --help` stays fast.
"""

__all__ = ["replay", "stability"]


def __getattr__(name: str):
    if name == "replay":
        from .replay import replay

        return replay
    if name == "stability":
        from .stability import stability

        return stability
    raise AttributeError(f"module 'workbench.fidelity' has no attribute {name!r}")
