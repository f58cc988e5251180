"""Speculation that pays per request: acceptance by draft position and the
engine's measured costs decide how many tokens each request drafts (0
included). Plain Python and numpy; no vLLM."""
