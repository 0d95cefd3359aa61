"""Latency of an OPT-125M-shaped length classifier (random weights: no checkpoint can be downloaded here).

Accuracy needs the real weights; speed does not. Run from the repo root:
    python docs/predictor/opt125m_latency.py PROMPTS.jsonl [cpu|cuda] [torch threads]
"""

import statistics
import sys
import time

import torch
from transformers import OPTConfig, OPTForSequenceClassification, PreTrainedTokenizerFast

from tetriinfer.predictor.artifact import DEFAULT_DIR
from tetriinfer.sched.lengths import BucketSpec
from tetriinfer.predictor.examples import read_examples
from tetriinfer.predictor.model_hf import HFLengthModel
from tetriinfer.predictor.serving import ModelLengthPredictor
from tetriinfer.predictor.tokenizer import load_tokenizer

path, device = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu"
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
bpe = load_tokenizer(DEFAULT_DIR / "tokenizer.json")
bpe.add_special_tokens(["</s>"])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
buckets = BucketSpec.covering(200)
config = OPTConfig(vocab_size=len(tokenizer), num_labels=buckets.num_buckets + 1)  # OPT-125M's shape
model = HFLengthModel(OPTForSequenceClassification(config), tokenizer, max_prompt_tokens=512)
predictor = ModelLengthPredictor(model, buckets, "head", device=device)
prompts = [ex.prompt for ex in read_examples(path)][:64]
predictor.predict(prompts[:32])  # warm-up
t0 = time.perf_counter()
for start in range(0, len(prompts), 32):
    predictor.predict(prompts[start : start + 32])
batched = (time.perf_counter() - t0) / len(prompts)
single = []
for p in prompts[:32]:
    t0 = time.perf_counter()
    predictor.predict([p])
    single.append(time.perf_counter() - t0)
print(f"opt-125m-shape device={device} threads={torch.get_num_threads()} params={model.num_parameters() / 1e6:.0f}M "
      f"ms/prompt (batch 32)={1000 * batched:.2f} ms (batch 1, median)={1000 * statistics.median(single):.2f}")
