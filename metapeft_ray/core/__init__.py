"""The Ray-free core: the config tree, data and episodes, backbone + adapters (`methods/`), the
one inner loop (`meta`), the meta-algorithms (`algorithms/`), the training loop (`train`),
meta-test and baselines, export and adaptation, the run store, the search-space schema, the local
recipe and the metric definitions. It never imports Ray (tests/test_layers.py); the Ray layer,
`metapeft_ray.on_ray`, calls it.
"""
