"""The serving engine for local models: iteration-level (continuous) batching, Orca/vLLM style.

`choices` holds what one request is (its prompts, each prompt's n choices, stop strings, logprobs,
the events it emits); `kv` the batch KV-cache operations (select rows, align by left padding,
concatenate); `scheduler` one model's batch (admission, chunked prefill, the decode step);
`engine` the one torch thread that steps every model's scheduler and runs other torch work between
steps; `sync` the same path stepped in the caller's thread (library use, tests). See docs/engine.md.
May import `experts.base`, `experts.errors` and `experts.hf.generation`; nothing else of ours.
"""
