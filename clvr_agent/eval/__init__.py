"""Measurement: GenEval's rules (:mod:`.rules`, a leaf every room may read), the ShapeWorld eval and
probe, GenEval on real images, the controller eval and the benches. Nothing here is imported at
package import."""
