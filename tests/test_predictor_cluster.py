"""The online predictor in the cluster: labels reach the predictor that predicted, /metrics shows it."""

from types import SimpleNamespace

import numpy as np
import pytest

from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.instance import Instance
from tetriinfer.cluster.length_labels import PromptStates
from tetriinfer.predictor.prom import PredictorCollector


class _Recorder:
    def __init__(self):
        self.observed, self.sent, self.states, self.submitted = [], [], [], []

    def observe(self, prompt, n, hidden=None):
        self.observed.append((list(prompt), n))
        self.states.append(hidden)

    def submit(self, prompts, hidden=None):
        self.submitted.append((prompts, hidden))


def _instance(instance_id: int, predictor, capacity: int = 4096):
    rec = predictor
    return SimpleNamespace(instance_id=instance_id, predictor=predictor, label_to={},
                           prompt_states=PromptStates(capacity),
                           _send_to=lambda dst, m: rec.sent.append((dst, m)) or True)


def _finished(rid: str, status: str = "stop", prompt_hidden=None):
    return SimpleNamespace(request_id=rid, prompt_token_ids=[5, 6, 7], output_token_ids=[1] * 42,
                           status=SimpleNamespace(value=status), prompt_hidden=prompt_hidden)


def test_a_request_decoded_elsewhere_sends_its_length_to_the_prefill_instance_that_predicted_it():
    rec = _Recorder()
    decode = _instance(3, rec)
    decode.label_to["r1"] = 0  # its KV came from prefill instance 0
    Instance._label(decode, _finished("r1"))
    assert rec.observed == [] and len(rec.sent) == 1
    dst, label = rec.sent[0]
    assert dst == 0 and isinstance(label, msg.LengthLabel) and label.output_len == 42 and label.request_id == "r1"
    assert msg.decode(msg.encode(label)) == label  # it travels as one of the cluster's messages
    assert decode.label_to == {}


def test_a_request_prefilled_here_teaches_the_local_predictor_and_aborts_teach_nothing():
    rec = _Recorder()
    prefill = _instance(0, rec)
    Instance._label(prefill, _finished("kept"))  # decoded on the prefill instance (adaptive)
    assert rec.observed == [([5, 6, 7], 42)] and rec.sent == []
    prefill.label_to["gone"] = 2
    Instance._label(prefill, _finished("gone", status="abort"))
    assert rec.observed == [([5, 6, 7], 42)] and rec.sent == [] and prefill.label_to == {}


def test_the_probe_pairs_a_label_from_the_decode_instance_with_the_state_kept_at_prediction():
    rec = _Recorder()
    prefill = _instance(0, rec)
    state = np.arange(4, dtype=np.float32)
    prefilled = _finished("r1", prompt_hidden=state)
    Instance._predict(prefill, prefilled)  # what placement waits for, once the prefill is done
    assert rec.submitted == [([[5, 6, 7]], [state])]
    Instance._on_length_label(prefill, msg.LengthLabel("r1", [5, 6, 7], 42))
    assert rec.observed == [([5, 6, 7], 42)] and rec.states[0] is state
    assert len(prefill.prompt_states) == 0  # the pair is made once
    Instance._on_length_label(prefill, msg.LengthLabel("r1", [5, 6, 7], 42))  # a duplicate: no state
    assert rec.states[1] is None


def test_the_probe_observes_a_request_decoded_where_it_was_prefilled_with_its_own_state():
    rec = _Recorder()
    prefill = _instance(0, rec)
    state = np.ones(4, dtype=np.float32)
    Instance._predict(prefill, _finished("kept", prompt_hidden=state))
    Instance._label(prefill, _finished("kept", prompt_hidden=state))  # adaptive: it decoded here
    assert rec.observed == [([5, 6, 7], 42)] and rec.states == [state] and rec.sent == []
    assert len(prefill.prompt_states) == 0


def test_kept_states_are_bounded_and_the_oldest_goes_first():
    states = PromptStates(capacity=3)
    for i in range(5):
        states.put(f"r{i}", np.full(2, i, np.float32))
    assert len(states) == 3 and states.pop("r0") is None and states.pop("r1") is None
    assert states.pop("r4")[0] == 4


@pytest.mark.parametrize("mode", [[], ["--mode", "colocated"]])
def test_predictor_probe_makes_every_instance_with_a_predictor_keep_prompt_hidden_states(mode):
    import argparse

    from tetriinfer.cluster.plan import instance_engine, instance_roles
    from tetriinfer.entrypoints.serve import add_parser, serve_config
    from tetriinfer.sched.monitor import COLOCATED

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for predictor, on in (["probe", True], ["probe:/a/dir", True], [None, False], ["static", False]):
        flags = ["--predictor", predictor] if predictor else []
        cfg = serve_config(parser.parse_args(["serve", *mode, *flags]))
        for role in instance_roles(cfg):  # a decode instance may prefill too (flip, adaptive)
            assert instance_engine(cfg, role, "cpu").capture_prompt_hidden == (on and role != COLOCATED)


def test_metrics_show_predicted_buckets_labels_and_online_accuracy():
    from prometheus_client import CollectorRegistry, generate_latest

    online = msg.PredictorStats(num_labels=120, online_accuracy=0.625, predicted_buckets=[3, 9, 0, 0, 1, 0],
                                num_unpaired=2)
    stats = SimpleNamespace(instances=[SimpleNamespace(instance_id=0, predictor=online),
                                       SimpleNamespace(instance_id=1, predictor=None)])
    registry = CollectorRegistry()
    registry.register(PredictorCollector(lambda: stats))
    text = generate_latest(registry).decode()
    assert 'tetriinfer_predicted_bucket_total{bucket="1",instance="0"} 9.0' in text
    assert 'tetriinfer_predictor_labels_total{instance="0"} 120.0' in text
    assert 'tetriinfer_predictor_online_accuracy{instance="0"} 0.625' in text
    assert 'tetriinfer_predictor_unpaired_labels_total{instance="0"} 2.0' in text
    assert 'instance="1"' not in text  # no online predictor there
    registry2 = CollectorRegistry()
    registry2.register(PredictorCollector(lambda: None))
    assert "tetriinfer_predict" not in generate_latest(registry2).decode()


@pytest.mark.parametrize("predictor", [None, "probe"])
def test_a_served_cluster_learns_from_finished_requests_and_shows_it_in_metrics(tmp_path, predictor):
    """Paper policy: every request is prefilled on instance 0 and decoded on instance 1, so each
    label travels decode -> prefill as a LengthLabel. The probe learns only from labels it pairs
    with the hidden state instance 0 kept: 12 labels learned, none unpaired."""
    import httpx

    from serve_utils import start_server

    args = ["--prefill-instances", "1", "--decode-instances", "1", "--policy", "paper", "--num-blocks", "256",
            "--chunk-size", "64", "--max-model-len", "512", *(["--predictor", predictor] if predictor else [])]
    with start_server(args, tmp_path) as server:
        for i in range(12):
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": f"Tell me about {i}", "max_tokens": 3 + i, "ignore_eos": True})
            assert r.status_code == 200, r.text

        def learned():
            samples = server.metrics()
            labels = server.metric_sum("tetriinfer_predictor_labels_total", samples, instance="0")
            return samples if labels >= 12 else None

        samples = server.wait_until(learned, 30, "12 labels learned by the prefill instance's predictor")
        assert server.metric_sum("tetriinfer_predicted_bucket_total", samples, instance="0") >= 12
        assert server.metric_sum("tetriinfer_predictor_labels_total", samples, instance="1") == 0
        assert 0.0 <= server.metric_sum("tetriinfer_predictor_online_accuracy", samples, instance="0") <= 1.0
        assert server.metric_sum("tetriinfer_predictor_unpaired_labels_total", samples, instance="0") == 0
