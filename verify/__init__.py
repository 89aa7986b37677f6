"""servetwin verify: deploy configs to real engines, replay traces, compare (later issue)."""
