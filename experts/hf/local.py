"""`local` experts: a full Hugging Face causal LM from the artifact store, loaded through the cache."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from experts.hf import generation
from experts.base import GenerationParams, GenerationResult, StreamDelta, StreamEnd, TokenLogprob
from experts.hf.chat import render_chat
from experts.hf.loading import LoadedModel, ModelCache
from experts.repository.registry import ExpertRecord


class LocalExpert:
    """Serves one registry record through the shared model cache (lazy load on first use)."""

    def __init__(self, record: ExpertRecord, cache: ModelCache) -> None:
        self.record = record
        self._cache = cache

    @property
    def id(self) -> str:
        return self.record.id

    def loaded(self) -> LoadedModel:
        return self._cache.get(self.record.id)

    def describe(self) -> dict[str, Any]:
        d = self.record.to_dict()
        d["loaded"] = self._cache.is_loaded(self.record.id)
        return d

    def count_tokens(self, text: str) -> int:
        return len(generation.encode(self.loaded().tokenizer, text))

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return render_chat(self.loaded().tokenizer, messages)

    def generate(self, prompt: str, params: GenerationParams) -> GenerationResult:
        m = self.loaded()
        return generation.generate(m.model, m.tokenizer, prompt, params)

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[StreamDelta | StreamEnd]:
        m = self.loaded()
        return generation.stream_generate(m.model, m.tokenizer, prompt, params)

    def score(self, text: str, *, top_logprobs: int = 0) -> list[TokenLogprob]:
        m = self.loaded()
        ids, _ = generation.start_ids(m.tokenizer, text)
        return generation.score_ids(m.model, m.tokenizer, ids, top_logprobs=top_logprobs)

    def detokenize(self, ids: list[int]) -> str:
        return self.loaded().tokenizer.decode(ids, clean_up_tokenization_spaces=False)
