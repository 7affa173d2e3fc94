"""fx-level passes and the types they share: trace, shapes, dims (axis expressions),
rules, and (for plans) simulate and shrink. Never imports ``depgraph``."""
