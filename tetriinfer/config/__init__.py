"""Typed configuration for every knob: the one source of defaults.

The CLI, the offline `LLM`, the server and the simulator all build these objects; nothing else
keeps its own defaults. This module imports nothing heavy (no torch): only the policies' names,
from `sched`, so `sim` and every layer above can use it.
"""

from __future__ import annotations

from tetriinfer.config.checks import check_choice, check_tensor_parallel_size
from tetriinfer.config.cluster import (
    ADMISSION_POLICIES, DISAGG_POLICIES, DISPATCH_POLICIES, PREFILL_POLICIES, SYSTEMS, ClusterConfig, ClusterShape,
    FlipConfig, PolicyConfig, SimConfig, SLOConfig,
)
from tetriinfer.config.engine import (
    ATTENTION_BACKENDS, DTYPE_CHOICES, DTYPES, ENGINE_STEP_POLICIES, KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATIONS,
    CacheConfig, EngineConfig, EngineSchedulerConfig, auto_dtype,
)
from tetriinfer.config.serve import (
    COLOCATED_BASELINES, KV_TRANSPORTS, LAUNCHERS, SERVE_MODES, UVICORN_LOG_LEVELS, ServeConfig,
)

__all__ = [
    "ADMISSION_POLICIES", "ATTENTION_BACKENDS", "COLOCATED_BASELINES", "DISAGG_POLICIES", "DISPATCH_POLICIES",
    "DTYPES", "DTYPE_CHOICES", "ENGINE_STEP_POLICIES", "KV_CACHE_DTYPES", "KV_TRANSPORTS", "LAUNCHERS", "LOAD_FORMATS",
    "PREFILL_POLICIES", "QUANTIZATIONS", "SERVE_MODES", "SYSTEMS", "UVICORN_LOG_LEVELS", "CacheConfig", "ClusterConfig",
    "ClusterShape", "EngineConfig", "EngineSchedulerConfig", "FlipConfig", "PolicyConfig", "SLOConfig", "ServeConfig",
    "SimConfig", "auto_dtype", "check_choice", "check_tensor_parallel_size",
]
