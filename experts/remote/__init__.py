"""Remote experts: OpenAI-compatible upstreams, the pooled client, breaker, check, secrets."""
