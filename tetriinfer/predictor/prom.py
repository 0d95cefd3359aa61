"""/metrics for the online length predictors: read from the cluster's latest stats at each scrape.

- `tetriinfer_predicted_bucket_total{instance,bucket}`: predictions per bucket (counter);
- `tetriinfer_predictor_labels_total{instance}`: finished requests the predictor learned from;
- `tetriinfer_predictor_online_accuracy{instance}`: served-bucket accuracy over the recent labels,
  each predicted before it was learned from (gauge; absent before the first label);
- `tetriinfer_predictor_unpaired_labels_total{instance}`: the probe (`--predictor probe`): labels
  that came back after their prompt's hidden state was evicted, so not learned from (counter).
Instances without an online predictor (colocated, `--predictor static` or `none`) report nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class PredictorCollector:
    def __init__(self, cluster_stats: Callable) -> None:
        self._cluster_stats = cluster_stats

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            stats = self._cluster_stats()
        except Exception:  # a scrape must not fail because the backend's view is broken
            log.exception("cluster_stats() failed; predictor metrics left out of this scrape")
            return
        online = [(str(i.instance_id), i.predictor) for i in (stats.instances if stats else [])
                  if getattr(i, "predictor", None) is not None]
        if not online:
            return
        buckets = CounterMetricFamily("tetriinfer_predicted_bucket", "Length predictions per bucket",
                                      labels=["instance", "bucket"])
        labels = CounterMetricFamily("tetriinfer_predictor_labels", "Finished requests the online predictor learned from",
                                     labels=["instance"])
        accuracy = GaugeMetricFamily("tetriinfer_predictor_online_accuracy",
                                     "Online predictor: bucket accuracy on the recent labels, each predicted before it "
                                     "was learned", labels=["instance"])
        unpaired = CounterMetricFamily("tetriinfer_predictor_unpaired_labels",
                                       "Online probe: labels whose prompt hidden state was no longer kept (not learned)",
                                       labels=["instance"])
        for instance, p in online:
            unpaired.add_metric([instance], float(p.num_unpaired))
            for bucket, n in enumerate(p.predicted_buckets):
                buckets.add_metric([instance, str(bucket)], float(n))
            labels.add_metric([instance], float(p.num_labels))
            if p.online_accuracy is not None:
                accuracy.add_metric([instance], p.online_accuracy)
        yield buckets
        yield labels
        yield accuracy
        yield unpaired
