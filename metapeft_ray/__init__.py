"""Meta-learned PEFT adapter inits, in two layers and a CLI: `metapeft_ray.core` (Ray-free: the
maths, the run store, the local recipe), `metapeft_ray.on_ray` (Ray Train, Tune, Jobs, Serve and
the Ray metrics backend, over the core) and `metapeft_ray.cli` on top."""
