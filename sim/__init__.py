"""servetwin's simulator: a deterministic discrete-event twin of an LLM serving stack."""

from ._native import install as _install_native

# before any engine module is imported: use the compiled build only if it matches (sim/_native.py)
_install_native()
