"""The roofline cost model against published/measured step times, and its basic physics."""

from pathlib import Path

import pytest

from tetriinfer.sim.cost import CostModel, KvLink, RooflineCostModel
from tetriinfer.sim.model_shape import ModelShape
from tetriinfer.sim.profile import load_profile

MEASURED_H100 = Path(__file__).parent / "data" / "profile_h100_llama3-8b_torch.json"


@pytest.fixture(scope="module")
def h100_llama():
    return RooflineCostModel.from_names("h100", "llama3-8b")


def within(value, reference, tolerance=0.30):
    return abs(value - reference) <= tolerance * reference


def test_is_a_cost_model(h100_llama):
    assert isinstance(h100_llama, CostModel)


def test_model_shapes_match_known_sizes():
    # Parameter counts as published (8.03B, 12.85B, 7.62B, 70.55B) and KV bytes/token in 16-bit.
    for name, params, kv in (
        ("llama3-8b", 8.03e9, 2 * 32 * 8 * 128 * 2),
        ("opt-13b", 12.85e9, 2 * 40 * 5120 * 2),
        ("qwen2.5-7b", 7.62e9, 2 * 28 * 4 * 128 * 2),
        ("llama3-70b", 70.55e9, 2 * 80 * 8 * 128 * 2),
    ):
        shape = ModelShape.from_preset(name)
        assert abs(shape.total_params - params) < 0.01 * params, name
        assert shape.kv_bytes_per_token == kv, name


def test_h100_llama3_8b_against_measurements(h100_llama):
    # Reference figures (vLLM-class engines on an H100 SXM, bf16): decode at batch 1 ~5.8 ms/step,
    # 256 sequences x 1k context ~18.8 ms/step, prefill ~47k tokens/s in 2048-token chunks.
    assert within(h100_llama.step_time(0, 0, 1, 1024), 5.8e-3)
    assert within(h100_llama.step_time(0, 0, 256, 256 * 1024), 18.8e-3)
    assert within(2048 / h100_llama.step_time(2048, 0, 0, 0), 47_000)


def test_h100_llama3_8b_against_our_own_measurement(h100_llama):
    # A plain-torch Llama-3-8B forward measured on an H100 (scripts/measure_forward.py),
    # 48 grid points. It is slower than vLLM-class engines (unfused kernels, SDPA with a mask), so the
    # roofline runs a little fast against it, but stays within 30% everywhere.
    profile = load_profile(MEASURED_H100)
    assert profile.metadata["device"].startswith("NVIDIA H100")
    points = [(n, c, 0, 0, profile.prefill(n, c)) for n in profile.prefill.rows for c in profile.prefill.cols]
    points += [(0, 0, b, b * c, profile.decode(b, c)) for b in profile.decode.rows for c in profile.decode.cols]
    assert len(points) == 48
    for *args, measured in points:
        assert within(h100_llama.step_time(*args), measured), args


def test_opt13b_v100_prefill_saturates_near_512_tokens():
    # The paper: OPT-13B prefill on a V100 saturates the accelerator near 512 tokens per chunk.
    # Saturated here = doubling the chunk gains under 10% throughput; below it, doubling gains more.
    model = RooflineCostModel.from_names("v100", "opt-13b")
    throughput = {n: n / model.step_time(n, 0, 0, 0) for n in (128, 256, 512, 1024, 2048)}
    gain = {n: throughput[2 * n] / throughput[n] - 1 for n in (128, 256, 512, 1024)}
    assert gain[128] > 0.2 and gain[256] > 0.15
    assert gain[512] < 0.10 and gain[1024] < 0.05


def test_step_time_grows_with_every_kind_of_work(h100_llama):
    base = h100_llama.step_time(512, 0, 0, 0)
    assert h100_llama.step_time(1024, 0, 0, 0) > base
    assert h100_llama.step_time(512, 4096, 0, 0) > base
    assert h100_llama.step_time(512, 0, 32, 32 * 1000) > base
    decode = h100_llama.step_time(0, 0, 64, 64 * 500)
    assert h100_llama.step_time(0, 0, 64, 64 * 2000) > decode
    assert h100_llama.step_time(0, 0, 0, 0) == 0.0


def test_decode_is_memory_bound_and_prefill_compute_bound(h100_llama):
    # A decode step at batch 8 costs about what batch 1 costs (the weights dominate) ...
    assert h100_llama.step_time(0, 0, 8, 8 * 512) < 1.1 * h100_llama.step_time(0, 0, 1, 512)
    # ... while a prefill chunk's time nearly doubles with its tokens once past the knee.
    ratio = h100_llama.step_time(8192, 0, 0, 0) / h100_llama.step_time(4096, 0, 0, 0)
    assert 1.8 < ratio < 2.2


def test_tensor_parallel_70b():
    with pytest.raises(ValueError, match="raise tp"):
        RooflineCostModel.from_names("h100", "llama3-70b", tp=1)
    tp4 = RooflineCostModel.from_names("h100", "llama3-70b", tp=4)
    tp8 = RooflineCostModel.from_names("h100", "llama3-70b", tp=8)
    assert tp8.step_time(0, 0, 1, 1000) < tp4.step_time(0, 0, 1, 1000)
    assert tp8.kv_capacity_tokens() > 2 * tp4.kv_capacity_tokens() * 0.9
    # 141 GB of weights over 4 GPUs at ~3 TB/s effective: ~12 ms per decode step.
    assert within(tp4.step_time(0, 0, 1, 1000), 12e-3)


def test_kv_capacity_is_memory_left_after_weights():
    model = RooflineCostModel.from_names("h100", "llama3-8b")
    left = int(79.6 * 2**30) * 0.9 - 1.0 * 2**30 - model.model.weight_bytes
    assert model.kv_capacity_tokens() == int(left // 131072)
    assert RooflineCostModel.from_names("h200", "llama3-8b").kv_capacity_tokens() > 1.9 * model.kv_capacity_tokens()
    # OPT-13B (24 GiB of weights) leaves a V100-32GB only a few thousand KV tokens.
    assert 2000 < RooflineCostModel.from_names("v100", "opt-13b").kv_capacity_tokens() < 8000


def test_transfer_time_is_latency_plus_bytes_over_bandwidth():
    model = RooflineCostModel.from_names("v100", "opt-13b", link_gbps=200.0, link_latency_s=1e-4)
    assert model.transfer_time(0) == pytest.approx(1e-4)
    assert model.transfer_time(25_000_000_000) == pytest.approx(1e-4 + 1.0)  # 25 GB at 200 Gbps
    nvlink = KvLink(gbps=300 * 8, latency_s=0.0)  # the paper's 300 GB/s
    assert nvlink.transfer_time(3 * 10**9) == pytest.approx(0.01)


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        RooflineCostModel.from_names("h100", "llama3-8b", gemm_efficiency=1.5)
    with pytest.raises(ValueError, match="unknown GPU"):
        RooflineCostModel.from_names("tpu", "llama3-8b")
    with pytest.raises(ValueError, match="unknown model preset"):
        RooflineCostModel.from_names("h100", "gpt-5")
    with pytest.raises(ValueError):
        KvLink(gbps=0)
