"""`local` experts (and `lora` experts and BTM forests): a model from the artifact store, loaded through
the cache and served by the batching engine.

The async path (`prepare` in a worker thread, then `stream` / `agenerate` on the engine) is what the
gateway uses; the blocking `generate` / `stream_sync` step the same code in the caller's thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from experts.base import GenerationParams, GenerationResult, StreamDelta, StreamEnd, TokenLogprob
from experts.errors import GenerationInputError
from experts.hf import generation
from experts.hf.chat import render_chat
from experts.hf.engine import sync
from experts.hf.engine.engine import Engine, Prompt
from experts.hf.loading import LoadedModel, ModelCache
from experts.hf.multilora import LoraFactors, MultiLora
from experts.hf.threads import run_sync
from experts.repository.registry import ExpertRecord


class LocalExpert:
    """Serves one registry record through the shared model cache (lazy load on first use)."""

    def __init__(self, record: ExpertRecord, cache: ModelCache, engine: Engine | None = None) -> None:
        self.record = record
        self._cache = cache
        self._engine = engine

    @property
    def id(self) -> str:
        return self.record.id

    def loaded(self) -> LoadedModel:
        return self._cache.get(self.record.id)

    def is_loaded(self) -> bool:
        return self._cache.is_loaded(self.record.id)

    def describe(self) -> dict[str, Any]:
        d = self.record.to_dict()
        d["loaded"] = self._cache.is_loaded(self.record.id)
        return d

    def count_tokens(self, text: str) -> int:
        return len(generation.encode(self.loaded().tokenizer, text))

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return render_chat(self.loaded().tokenizer, messages)

    def detokenize(self, ids: list[int]) -> str:
        return self.loaded().tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    # -- the engine path ------------------------------------------------------------------------
    def prepare(self, prompt: str | Sequence[int], max_tokens: int) -> Prompt:
        """Tokenize and check one prompt (blocking; run it off the event loop). A text far over the
        context is refused before tokenizing it; token ids must be in the vocabulary."""
        m = self.loaded()
        tok = m.tokenizer
        ctx = generation.context_length(m.model)
        if isinstance(prompt, str):
            if len(prompt) > (ctx + 1) * _max_token_chars(tok):
                raise GenerationInputError(f"the prompt has {len(prompt)} characters, more than this model's "
                                           f"context of {ctx} tokens can hold", code="context_length_exceeded",
                                           param="prompt")
            ids, n_prompt = generation.start_ids(tok, prompt)
            text = prompt
        else:
            ids = [int(i) for i in prompt]
            vocab = len(tok)
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise GenerationInputError(f"token id {bad} is not in this model's vocabulary (0..{vocab - 1})",
                                           code="token_out_of_vocabulary", param="prompt")
            if not ids:
                ids, n_prompt = generation.start_ids(tok, "")
            else:
                n_prompt = len(ids)
            text = tok.decode(ids, clean_up_tokenization_spaces=False) if n_prompt else ""
        generation.check_fits(m.model, len(ids), max_tokens)
        return Prompt(text, ids, n_prompt)

    def adapter(self) -> LoraFactors | None:
        """LoRA factors applied on top of the loaded model (None: the model as it is)."""
        return None

    @property
    def engine_label(self) -> str:
        """The model the engine batches this expert with (its metrics' label)."""
        return self.record.id

    def stream(self, prompts: Sequence[Prompt], params: GenerationParams, *, whole: bool = False
               ) -> AsyncIterator[StreamDelta | StreamEnd]:
        """Submit to the engine (a full queue raises here) and iterate the events; choice indices run
        prompt by prompt (prompt i's choices are i*n .. i*n+n-1). `whole`: the events arrive at the end
        (for an answer that is not streamed: no wake-up per token)."""
        if self._engine is None:
            raise RuntimeError("this expert was built without an engine; use generate() or stream_sync()")
        m = self.loaded()
        return self._engine.stream(self.engine_label, m.model, m.tokenizer, prompts, params, whole=whole,
                                   adapter=self.adapter())

    async def agenerate(self, prompt: str, params: GenerationParams) -> GenerationResult:
        """One prompt through the engine, collected (for callers inside the gateway, e.g. ensembles); without
        an engine, the blocking path in a worker thread."""
        if self._engine is None:
            return await run_sync(self.generate, prompt, params)
        prepared = await self._engine.run(self.prepare, prompt, params.max_tokens)
        return await collect_async(self.stream([prepared], params, whole=True), params)

    # -- blocking -------------------------------------------------------------------------------
    def generate(self, prompt: str, params: GenerationParams) -> GenerationResult:
        m = self.loaded()
        return sync.generate(m.model, m.tokenizer, prompt, params, adapter=self.adapter())

    def stream_sync(self, prompt: str, params: GenerationParams) -> Iterator[StreamDelta | StreamEnd]:
        m = self.loaded()
        return sync.stream_generate(m.model, m.tokenizer, prompt, params, adapter=self.adapter())

    def score(self, text: str, *, top_logprobs: int = 0) -> list[TokenLogprob]:
        m = self.loaded()
        ids, _ = generation.start_ids(m.tokenizer, text)
        with MultiLora.of(m.model).applied([self.adapter()]):
            return generation.score_ids(m.model, m.tokenizer, ids, top_logprobs=top_logprobs)


class AdapterExpert(LocalExpert):
    """A LoRA adapter, or a request-time mix of adapters, served on its base's resident model: requests for
    any adapter of one base share that base's batch, each row with its own adapter (never merged weights)."""

    def __init__(self, record: ExpertRecord, cache: ModelCache, engine: Engine | None, *, base: str,
                 factors: Callable[[], LoraFactors]) -> None:
        super().__init__(record, cache, engine)
        self.base = base
        self._factors = factors

    def loaded(self) -> LoadedModel:
        return self._cache.get(self.base)

    def is_loaded(self) -> bool:
        return self._cache.is_loaded(self.base)

    def adapter(self) -> LoraFactors:
        return self._factors()

    @property
    def engine_label(self) -> str:
        return self.base


async def collect_async(events: AsyncIterator[StreamDelta | StreamEnd], params: GenerationParams,
                        n: int | None = None) -> GenerationResult:
    """Whole choices from a request's async events (`n` choices in all; default `params.n`)."""
    count = params.n if n is None else n
    choices = sync.new_choices(count, params)
    seen = [False] * count
    end: StreamEnd | None = None
    async for ev in events:
        if isinstance(ev, StreamEnd):
            end = ev
        else:
            sync.add_event(choices, seen, ev, params)
    assert end is not None
    return GenerationResult(choices, end.prompt_tokens, end.completion_tokens)


def _max_token_chars(tokenizer: Any) -> int:
    """The longest token's text, in characters (an upper bound on how much text one token covers)."""
    cached = getattr(tokenizer, "_mergegate_max_token_chars", None)
    if cached is None:
        cached = max((len(t) for t in tokenizer.get_vocab()), default=16) or 16
        tokenizer._mergegate_max_token_chars = cached
    return cached
