"""Training end to end on a small learnable task: the built-in model and the Hugging Face path."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from tetriinfer.predictor.config import TrainConfig
from tetriinfer.predictor.artifact import read_meta
from tetriinfer.predictor.evaluate import evaluate
from tetriinfer.predictor.examples import LengthExample, write_examples
from tetriinfer.predictor.objectives import bucket_probs_and_scores, pairwise_rank_loss
from tetriinfer.predictor.serving import load_predictor
from tetriinfer.predictor.train import train

# The request's wording sets the reply length (with noise); the topic is a distractor.
STYLES = [("answer in one word:", 1, 150), ("briefly explain", 220, 380), ("explain in detail", 420, 580),
          ("write a long essay on", 1050, 1500)]
TOPICS = ["rivers", "tax law", "python", "birds", "the moon", "jazz", "cooking", "chess", "trains", "glass"]


def _examples(n: int, seed: int) -> list[LengthExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        style, lo, hi = rng.choice(STYLES)
        prompt = f"USER: please {style} {rng.choice(TOPICS)} {rng.choice(TOPICS)}\n"
        out.append(LengthExample(prompt, output_tokens=rng.randint(lo, hi), group=f"g{seed}-{i}"))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lengths")
    for name, n, seed in (("train", 600, 0), ("val", 150, 1), ("test", 300, 2)):
        write_examples(root / f"{name}.jsonl", _examples(n, seed))
    return root


def test_pairwise_rank_loss_prefers_correct_order():
    tokens = torch.tensor([10.0, 50.0, 200.0])
    good = pairwise_rank_loss(torch.tensor([0.0, 1.0, 2.0]), tokens)
    bad = pairwise_rank_loss(torch.tensor([2.0, 1.0, 0.0]), tokens)
    assert good < bad


def test_expected_log_length_ranks_a_split_bet_below_a_sure_middle_bucket():
    from tetriinfer.sched.lengths import BucketSpec

    spec = BucketSpec(200, 6)  # midpoints 100, 300, ..., 1100
    probs = torch.tensor([[0.5, 0, 0, 0, 0, 0.5],   # half 100, half 1100: mean 600, geometric mean ~332
                          [0, 0, 1.0, 0, 0, 0]])    # surely 500
    logits = torch.cat([probs.clamp_min(1e-12).log(), torch.tensor([[2.0], [1.0]])], 1)
    _, head = bucket_probs_and_scores(logits, spec, "head")
    _, expected = bucket_probs_and_scores(logits, spec, "expected")
    got_probs, log_length = bucket_probs_and_scores(logits, spec, "expected_log_length")
    assert head[0] > head[1] and expected[0] > expected[1]
    assert log_length[0] < log_length[1]  # the option changes the ranking
    mids = torch.tensor([100.0, 300, 500, 700, 900, 1100])
    assert log_length.tolist() == pytest.approx((got_probs @ mids.log()).tolist(), abs=1e-5)
    assert log_length[1].item() == pytest.approx(float(torch.tensor(500.0).log()), abs=1e-5)
    with pytest.raises(ValueError, match="score source"):
        bucket_probs_and_scores(logits, spec, "median")


def test_score_option_is_refused_where_the_outputs_it_needs_are_untrained():
    with pytest.raises(ValueError, match="bucket logits"):
        TrainConfig(data="d", out="o", loss="rank", score="expected_log_length")
    with pytest.raises(ValueError, match="ranking loss"):
        TrainConfig(data="d", out="o", loss="ce", score="head")
    with pytest.raises(ValueError, match="score must be one of"):
        TrainConfig(data="d", out="o", score="median")


# The transformer learns the buckets more slowly and less steadily across seeds (0.50-0.84 accuracy
# over seeds 0-2), so it gets a smaller margin; both must rank well.
@pytest.mark.parametrize("form, features, margin", [("bag", "shape", 0.3), ("bag", "text", 0.3),
                                                   ("transformer", "shape", 0.15)])
def test_builtin_model_beats_majority_on_held_out(data_dir, tmp_path, form, features, margin):
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / form), model=form, granularity=200, epochs=6,
                      batch_size=32, dim=32, vocab_size=500, max_prompt_tokens=64, eval_every=40, features=features)
    train(cfg)
    assert load_predictor(tmp_path / form).model.cfg.features == features  # the set is saved and read back
    report = evaluate(tmp_path / form, _examples(300, 2), single_prompt_runs=3)
    assert report.accuracy > report.majority_accuracy + margin
    assert report.mae_tokens < report.majority_mae_tokens
    assert report.kendall_tau > 0.5
    assert (tmp_path / form / "curves.png").is_file()


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, data_dir):
    """A random tiny OPT classifier and a BPE tokenizer, saved like a real local checkpoint."""
    from transformers import OPTConfig, OPTForSequenceClassification, PreTrainedTokenizerFast

    from tetriinfer.predictor.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tiny-opt")
    bpe = train_bpe((ex.prompt for ex in _examples(200, 5)), vocab_size=300)
    bpe.add_special_tokens(["</s>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    OPTForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hf_classifier_trains_and_predicts(data_dir, tiny_hf_dir, tmp_path):
    out = tmp_path / "hf-pred"
    cfg = TrainConfig(data=str(data_dir), out=str(out), model=str(tiny_hf_dir), loss="ce", epochs=1,
                      batch_size=16, max_train_examples=64, max_prompt_tokens=32, lr=1e-3, eval_every=2)
    before = load_file(str(tiny_hf_dir / "model.safetensors"))
    meta = train(cfg)
    assert meta.kind == "hf" and meta.buckets.num_buckets == 6
    predictor = load_predictor(out)
    after = predictor.model.model.state_dict()
    body = [k for k in before if not k.startswith("score") and k in after]  # the head was resized
    assert body, "no pretrained weight was loaded"
    assert any(not torch.equal(before[k], after[k]) for k in body), "training did not update the body"
    predictions = predictor.predict(["USER: please explain in detail jazz\n", "USER: hi\n"])
    assert len(predictions) == 2
    for p in predictions:
        assert 0 <= p.bucket < 6 and p.lower == 200 * p.bucket and p.upper > p.lower


def test_ensemble_of_two_seeds_loads_predicts_and_ranks(data_dir, tmp_path):
    from tetriinfer.predictor.ensemble import combine

    runs = []
    for seed in (0, 1):
        cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / f"s{seed}"), epochs=4, batch_size=32, dim=16,
                          vocab_size=500, max_prompt_tokens=64, eval_every=40, features="text", seed=seed)
        train(cfg)
        runs.append(tmp_path / f"s{seed}")
    meta_file = runs[1] / "predictor.json"  # a run written before `members` was recorded still combines
    meta = json.loads(meta_file.read_text())
    del meta["model"]["members"]
    meta_file.write_text(json.dumps(meta))
    summary = combine(runs, tmp_path / "ens", data_dir)
    assert summary["val_tau"] > 0.5
    predictor = load_predictor(tmp_path / "ens")
    assert predictor.model.cfg.members == 2
    report = evaluate(tmp_path / "ens", _examples(300, 2), single_prompt_runs=3)
    assert report.accuracy > report.majority_accuracy + 0.3 and report.kendall_tau > 0.5
    with pytest.raises(ValueError, match="at least two"):
        combine(runs[:1], tmp_path / "one", data_dir)

    # the same members ranked by expected log length: saved, read back, and used by predict and eval
    log_summary = combine(runs, tmp_path / "ens-log", data_dir, score="expected_log_length")
    assert read_meta(tmp_path / "ens").score_source == "head"
    assert read_meta(tmp_path / "ens-log").score_source == "expected_log_length"
    assert log_summary["val_accuracy"] == pytest.approx(summary["val_accuracy"])  # same buckets
    log_predictor = load_predictor(tmp_path / "ens-log")
    assert log_predictor.score_source == "expected_log_length"
    prompts = [ex.prompt for ex in _examples(40, 3)]
    with torch.inference_mode():
        logits = log_predictor.model(**log_predictor.model.collate(log_predictor.model.tokenize(prompts)))
    probs, _ = bucket_probs_and_scores(logits, read_meta(tmp_path / "ens-log").buckets, "head")
    mids = torch.tensor([100.0, 300, 500, 700, 900, 1100])
    got = [p.score for p in log_predictor.predict(prompts)]
    assert got == pytest.approx((probs @ mids.log()).tolist(), abs=1e-4)
    assert [p.bucket for p in log_predictor.predict(prompts)] == [p.bucket for p in predictor.predict(prompts)]
    log_report = evaluate(tmp_path / "ens-log", _examples(300, 2), single_prompt_runs=3)
    assert log_report.accuracy == pytest.approx(report.accuracy) and log_report.kendall_tau > 0.5
    with pytest.raises(ValueError, match="score must be one of"):
        combine(runs, tmp_path / "bad", data_dir, score="median")
