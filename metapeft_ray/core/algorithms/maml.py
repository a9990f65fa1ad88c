"""MAML (Finn et al. 2017) with the Proto-MAML head: the contribution is the query-loss gradient
w.r.t. the adapter init, ``d L_query(phi_K) / d phi_0``, through the K inner steps (second
order) or with the inner gradients held constant (``meta.first_order``). The base behaviour."""

from __future__ import annotations

from metapeft_ray.core.algorithms.base import MetaAlgorithm


class MAML(MetaAlgorithm):
    name = "maml"
