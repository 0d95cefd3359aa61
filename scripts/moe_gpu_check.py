"""MoE on a CUDA GPU (not a test): greedy tokens of HF-built tiny Mixtral / Qwen2-MoE / Qwen3-MoE,
engine (CUDA graphs, Triton attention, float32) against transformers on the same GPU.

    PYTHONPATH=. python3 scripts/moe_gpu_check.py OUT.json    # from the repository root (reads tests/hf_models.py)
"""
import json, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "tests")
from hf_models import build_hf_model
from tetriinfer import LLM, SamplingParams

res = {}
for fam in ("mixtral", "qwen2-moe", "qwen3-moe"):
    d = Path(tempfile.mkdtemp()) / fam
    hf = build_hf_model(fam, d).cuda()
    prompts = [torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 7, 33, 70, 150, 5, 12, 90)]
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    llm = LLM(str(d), dtype="float32", device="cuda", num_blocks=256, chunk_size=64)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts,
            sampling_params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))]
    same = sum(a == b for a, b in zip(refs, outs))
    res[fam] = dict(prompts=len(prompts), identical=same, config=str(llm.engine.config)[:300])
    print(fam, f"{same}/{len(prompts)} prompts give transformers' greedy tokens", flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
