"""servetwin calibrate: fit timing profiles from measured forward passes (later issue)."""
