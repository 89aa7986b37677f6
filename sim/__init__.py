"""servetwin's simulator: a deterministic discrete-event twin of an LLM serving stack."""
