"""Offline batch inference in the shape vLLM users know: `LLM(...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from typing import Sequence

from tqdm import tqdm

from tetriinfer.config import EngineConfig
from tetriinfer.engine.engine import LLMEngine
from tetriinfer.engine.request import RequestOutput
from tetriinfer.sampling_params import SamplingParams


class LLM:
    """An engine on one device (or `tensor_parallel_size` of them). Keyword arguments are the fields
    of EngineConfig (model, dtype, device, load_format, attention_backend, seed, max_model_len,
    tensor_parallel_size, quantization, kv_cache_dtype), CacheConfig (block_size,
    num_blocks, memory_fraction, enable_prefix_caching) and EngineSchedulerConfig (chunk_size,
    max_num_seqs, step_policy)."""

    def __init__(self, model: str = "tiny", **kwargs):
        config = EngineConfig.from_flat(model, **kwargs)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()
        self._default_sampling: SamplingParams | None = None

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` uses without sampling params: the model's generation_config.json
        settings (temperature, top_p, top_k, min_p, repetition_penalty; max_new_tokens as max_tokens),
        else SamplingParams' own defaults, as vLLM's LLM does. Read once, at the first call."""
        if self._default_sampling is None:
            self._default_sampling = self._read_default_sampling()
        return self._default_sampling

    def _read_default_sampling(self) -> SamplingParams:
        from tetriinfer.model.loader import generation_defaults, resolve_model

        defaults = generation_defaults(resolve_model(self.engine.config.model)[1])
        if "max_new_tokens" in defaults:
            defaults["max_tokens"] = defaults.pop("max_new_tokens")
        if defaults.get("top_k") == -1:
            defaults["top_k"] = 0
        return SamplingParams(**defaults)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        *,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation ([{"role": ..., "content": ...}, ...]) or a list of
        them, formatted by the model's chat template (a simple documented one for the presets), or
        by `chat_template` (a file's path or the template itself); the other keywords are vLLM's
        `LLM.chat` ones (`tools` are shown to the template; their calls are not parsed here)."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model directory has no tokenizer.json, so it has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        for i, conv in enumerate(conversations):
            if not conv or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in conv):
                raise ValueError(f"conversation {i}: give a non-empty list of {{'role': ..., 'content': ...}} messages")
        from tetriinfer.model.chat_template import resolve_chat_template

        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt=False")
        template = resolve_chat_template(chat_template) if chat_template else None
        prompts = [tokenizer.apply_chat_template(conv, add_generation_prompt, continue_final_message=continue_final_message,
                                                 tools=tools, template_kwargs=chat_template_kwargs, chat_template=template)
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts.

        All prompts are validated before any runs: a bad one raises ValueError naming its index, and
        the engine is left as it was."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        items = [(p, None) for p in prompts] if prompts is not None else [(None, list(t)) for t in prompt_token_ids]
        if not items:
            return []
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"got {len(params)} sampling params for {len(items)} prompts")

        request_ids = []
        try:
            for i, ((text, ids), sp) in enumerate(zip(items, params)):
                rid = f"offline-{next(self._ids)}"
                try:
                    self.engine.add_request(rid, prompt=text, prompt_token_ids=ids, sampling=sp)
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
                request_ids.append(rid)
        except ValueError:
            for rid in request_ids:
                self.engine.abort_request(rid)
            raise

        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), disable=not use_tqdm, desc="generate", unit="req") as bar:
            while len(finished) < len(request_ids):
                for out in self.engine.step(final_only=True):
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[rid] for rid in request_ids]
