"""The online predictor in the cluster: labels reach the predictor that predicted, /metrics shows it."""

from types import SimpleNamespace

from tetriinfer.cluster import messages as msg
from tetriinfer.cluster.instance import Instance
from tetriinfer.predictor.prom import PredictorCollector


class _Recorder:
    def __init__(self):
        self.observed, self.sent = [], []

    def observe(self, prompt, n):
        self.observed.append((list(prompt), n))


def _instance(instance_id: int, predictor):
    rec = predictor
    return SimpleNamespace(instance_id=instance_id, predictor=predictor, label_to={},
                           _send_to=lambda dst, m: rec.sent.append((dst, m)) or True)


def _finished(rid: str, status: str = "stop"):
    return SimpleNamespace(request_id=rid, prompt_token_ids=[5, 6, 7], output_token_ids=[1] * 42,
                           status=SimpleNamespace(value=status))


def test_a_request_decoded_elsewhere_sends_its_length_to_the_prefill_instance_that_predicted_it():
    rec = _Recorder()
    decode = _instance(3, rec)
    decode.label_to["r1"] = 0  # its KV came from prefill instance 0
    Instance._label(decode, _finished("r1"))
    assert rec.observed == [] and len(rec.sent) == 1
    dst, label = rec.sent[0]
    assert dst == 0 and isinstance(label, msg.LengthLabel) and label.output_len == 42
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


def test_metrics_show_predicted_buckets_labels_and_online_accuracy():
    from prometheus_client import CollectorRegistry, generate_latest

    online = msg.PredictorStats(num_labels=120, online_accuracy=0.625, predicted_buckets=[3, 9, 0, 0, 1, 0])
    stats = SimpleNamespace(instances=[SimpleNamespace(instance_id=0, predictor=online),
                                       SimpleNamespace(instance_id=1, predictor=None)])
    registry = CollectorRegistry()
    registry.register(PredictorCollector(lambda: stats))
    text = generate_latest(registry).decode()
    assert 'tetriinfer_predicted_bucket_total{bucket="1",instance="0"} 9.0' in text
    assert 'tetriinfer_predictor_labels_total{instance="0"} 120.0' in text
    assert 'tetriinfer_predictor_online_accuracy{instance="0"} 0.625' in text
    assert 'instance="1"' not in text  # no online predictor there
    registry2 = CollectorRegistry()
    registry2.register(PredictorCollector(lambda: None))
    assert "tetriinfer_predict" not in generate_latest(registry2).decode()


def test_a_served_cluster_learns_from_finished_requests_and_shows_it_in_metrics(tmp_path):
    """Paper policy: every request is prefilled on instance 0 and decoded on instance 1, so each
    label travels decode -> prefill as a LengthLabel."""
    import httpx

    from serve_utils import start_server

    args = ["--prefill-instances", "1", "--decode-instances", "1", "--policy", "paper", "--num-blocks", "256",
            "--chunk-size", "64", "--max-model-len", "512"]
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
