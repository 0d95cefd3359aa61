"""Response shapes of a job: the whole body (one choice per sub-request), and the stream's chunks
(content, echoed prompt, finish, usage). Token texts come from decoding each token id alone.

Completions with `echo` put the prompt before the text, and with `logprobs` the prompt's logprobs
before the output's (its first token has none: null, as in OpenAI's and vLLM's answers); with
`max_tokens: 0` only the prompt is returned (lm-eval's loglikelihood requests). vLLM's
`prompt_logprobs` field puts the prompt's logprobs, ranks and top-N on each completions choice, or
once on a chat response (not streamed).
"""

from __future__ import annotations

from tetriinfer.cluster.messages import TokenDelta
from tetriinfer.server import responses
from tetriinfer.server.chat_deltas import ChatDeltas, read_message
from tetriinfer.server.jobs import Job, SubRequest
from tetriinfer.server.streaming import Output, sse


class Renderer:
    def __init__(self, job: Job, tokenizer):
        self.job = job
        self.tokenizer = tokenizer
        self.top_n = job.sampling.logprobs or 0  # 0: chosen tokens only

    # ---- pieces ----------------------------------------------------------------------------------
    def texts(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) if self.tokenizer is not None else "" for t in token_ids]

    def tops(self, tops: list[list[tuple[int, float]]] | None, count: int) -> list | None:
        """Top-N (id, logprob) lists as (text, logprob) lists; None when N is 0."""
        if not self.top_n:
            return None
        tops = tops or []
        # [:top_n]: the engine's prompt top-N may be longer (vLLM's prompt_logprobs asked for more)
        return [[(self.texts([t])[0], lp) for t, lp in (tops[i][:self.top_n] if i < len(tops) else [])]
                for i in range(count)]

    def prompt_text(self, sub: SubRequest) -> str:
        if sub.prompt is not None:
            return sub.prompt
        return self.tokenizer.decode(sub.prompt_token_ids) if self.tokenizer is not None else ""

    def _completion_logprobs(self, sub: SubRequest, out: Output, token_ids: list[int], logprobs: list,
                             tops: list | None, echo: bool, text_offset: int) -> dict:
        texts, values, top_texts = [], [], []
        if echo:
            ids = sub.prompt_token_ids
            texts += self.texts(ids)
            values += out.prompt_logprobs if out.prompt_logprobs is not None else [None] * len(ids)
            prompt_tops = self.tops(out.prompt_top_logprobs, len(ids))
            top_texts += [None] + (prompt_tops[1:] if prompt_tops is not None else [None] * (len(ids) - 1))
        texts += self.texts(token_ids)
        values += list(logprobs) if logprobs is not None else [None] * len(token_ids)
        top_texts += self.tops(tops, len(token_ids)) or [None] * len(token_ids)
        return responses.completion_logprobs(texts, values, text_offset, top_texts if self.top_n else None)

    def prompt_logprobs(self, sub: SubRequest, out: Output) -> list | None:
        """vLLM's `prompt_logprobs` field (the engine computed them for echo's logprobs too: the
        same top lists, cut to this field's N)."""
        n = self.job.prompt_logprobs
        if n is None or out.prompt_logprobs is None:
            return None
        ids, tops = sub.prompt_token_ids, out.prompt_top_logprobs or []
        ranks = out.prompt_ranks or [None] * len(ids)
        top_texts = [[(t, self.texts([t])[0], lp) for t, lp in (tops[k][:n] if k < len(tops) else [])]
                     for k in range(len(ids))]
        return responses.prompt_logprobs(ids, self.texts(ids), out.prompt_logprobs, ranks, top_texts)

    def _chat_logprobs(self, token_ids: list[int], logprobs: list | None, tops: list | None) -> dict:
        values = list(logprobs) if logprobs is not None else [None] * len(token_ids)
        return responses.chat_logprobs(self.texts(token_ids), values, self.tops(tops, len(token_ids)))

    # ---- the whole body --------------------------------------------------------------------------
    def usage(self, completion_tokens: int, cached_tokens: int) -> dict:
        return responses.usage(self.job.prompt_tokens, completion_tokens, cached_tokens)

    def completion_tokens(self, outputs: dict[int, Output]) -> int:
        return 0 if self.job.prompt_only else sum(len(o.token_ids) for o in outputs.values())

    def cached_tokens(self, outputs: dict[int, Output]) -> int:
        seen = {}
        for sub in self.job.subs:
            seen.setdefault(sub.prompt_index, outputs[sub.index].num_cached_tokens)
        return sum(seen.values())

    def body(self, outputs: dict[int, Output]) -> dict:
        job = self.job
        choices = []
        for sub in job.subs:
            out = outputs[sub.index]
            if job.chat:
                logprobs = None if job.sampling.logprobs is None else self._chat_logprobs(
                    out.token_ids, out.logprobs, out.top_logprobs)
                fields, finish = read_message(out.text, out.finish_reason, job.reasoning_parser, job.tool_calling)
                message = {"role": "assistant", **fields}
                choices.append(responses.chat_choice(message, finish, logprobs, out.stop_reason, index=sub.index))
                continue
            ids, lps, text, finish = out.token_ids, out.logprobs, out.text, out.finish_reason
            if job.prompt_only:
                ids, lps, text, finish = [], [], "", "length"
            if job.echo:
                text = self.prompt_text(sub) + text
            logprobs = None if job.sampling.logprobs is None else self._completion_logprobs(
                sub, out, ids, lps, out.top_logprobs, job.echo, 0)
            choices.append(responses.completion_choice(text, finish, logprobs,
                                                       None if job.prompt_only else out.stop_reason, index=sub.index))
            if job.prompt_logprobs is not None:  # vLLM's: per choice in completions
                choices[-1]["prompt_logprobs"] = self.prompt_logprobs(sub, out)
        body = responses.response(job.request_id, "chat.completion" if job.chat else "text_completion", job.created,
                                  job.model, choices, self.usage(self.completion_tokens(outputs),
                                                                 self.cached_tokens(outputs)))
        if job.chat and job.prompt_logprobs is not None:  # vLLM's: once per chat response (one prompt)
            body["prompt_logprobs"] = self.prompt_logprobs(job.subs[0], outputs[job.subs[0].index])
        return body

    # ---- stream chunks ---------------------------------------------------------------------------
    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        job = self.job
        return sse(responses.response(job.request_id, "chat.completion.chunk" if job.chat else "text_completion",
                                      job.created, job.model, choices, usage))

    def role_choice(self, index: int) -> dict:
        return responses.chat_choice({"role": "assistant", "content": ""}, None, delta=True, index=index)

    def echo_choice(self, sub: SubRequest, out: Output) -> dict:
        """Completions with echo: the prompt (and its logprobs) as the choice's first chunk."""
        logprobs = None if self.job.sampling.logprobs is None else self._completion_logprobs(
            sub, out, [], [], [], True, 0)
        return responses.completion_choice(self.prompt_text(sub), None, logprobs, index=sub.index)

    def content_choice(self, sub: SubRequest, delta: TokenDelta, text_offset: int) -> dict:
        job = self.job
        if job.chat:
            logprobs = None if job.sampling.logprobs is None else self._chat_logprobs(
                delta.token_ids, delta.logprobs, delta.top_logprobs)
            return responses.chat_choice({"content": delta.text}, None, logprobs, delta=True, index=sub.index)
        logprobs = None if job.sampling.logprobs is None else self._completion_logprobs(
            sub, Output(), delta.token_ids, delta.logprobs, delta.top_logprobs, False, text_offset)
        return responses.completion_choice(delta.text, None, logprobs, index=sub.index)

    def parsed_delta_choices(self, sub: SubRequest, delta: TokenDelta, stream: ChatDeltas) -> list[dict]:
        """Chat with a reasoning parser or tool calling: what of the delta's text may go out now (its
        logprobs ride along, on an empty delta if all its text is held back)."""
        fields = stream.add(delta.text)
        logprobs = None if self.job.sampling.logprobs is None else self._chat_logprobs(
            delta.token_ids, delta.logprobs, delta.top_logprobs)
        if not fields and logprobs is None:
            return []
        return [responses.chat_choice(fields or {"content": ""}, None, logprobs, delta=True, index=sub.index)]

    def parsed_finish_choices(self, sub: SubRequest, out: Output, stream: ChatDeltas) -> list[dict]:
        """At the finish: what was held back (or the tool calls, whole) in one delta, then the finish chunk."""
        fields, finish = stream.finish(out.finish_reason)
        last = responses.chat_choice({}, finish, None, out.stop_reason, delta=True, index=sub.index)
        return [responses.chat_choice(fields, None, delta=True, index=sub.index), last] if fields else [last]

    def finish_choice(self, sub: SubRequest, out: Output) -> dict:
        if self.job.chat:
            return responses.chat_choice({}, out.finish_reason, None, out.stop_reason, delta=True, index=sub.index)
        if self.job.prompt_only:
            return responses.completion_choice("", "length", None, index=sub.index)
        return responses.completion_choice("", out.finish_reason, None, out.stop_reason, index=sub.index)
