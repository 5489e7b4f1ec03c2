"""Adapters that reproduce other frameworks' conventions with fastalign ops.

`fastalign.integrations.verl`, `.openrlhf` and `.trl` each expose functions named and called like
the peer's own (same arguments, same return values), computed with fastalign's ops, with the
peer's small numerical conventions kept (epsilons, clamps, masking, variance, aggregation), so
swapping one in changes speed and memory, not results. These adapters never import the peer.
Where a peer and fastalign's own defaults differ, the module docstrings say how;
docs/integrations.md has the table. Each is tested against the peer's formulas in
tests/test_peer_numerics.py.

The one exception that does import its peer: `fastalign.integrations.trl.patch_trl()` (or
`with use_fastalign():`) patches an installed TRL so that its trainers compute their log-prob /
entropy head with fastalign (tests/test_trl_integration.py runs real TRL trainer steps both ways).
`fastalign.integrations.transformers.patch_causal_lm(model)` patches a Hugging Face causal LM.
"""
