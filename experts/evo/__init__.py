"""Evo-Merging: merge sessions (provider side), search jobs and their HTTP client (client side), demo pool."""
