"""TetriInfer: LLM serving with fixed-size chunked prefill, disaggregated prefill/decode instances
and length-aware two-level scheduling.

`from tetriinfer import LLM, SamplingParams` for offline inference. The heavy parts (torch) load on
first use, so the torch-free layers (`sched`, `sim`, `bench`) import without them.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from tetriinfer.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tetriinfer.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'tetriinfer' has no attribute {name!r}")
