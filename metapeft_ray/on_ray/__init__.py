"""The Ray layer over the Ray-free `metapeft_ray.core`: Ray Train (`distributed`), Ray Tune
(`tune`), job submission (`jobs`), Ray Serve (`serve`) and the ``ray.util.metrics`` backend
(`metrics`). Nothing in the core imports it.

Importing it routes this process's metrics (`metapeft_ray.core.metrics`) through Ray whenever Ray
is initialised here, so every process that runs Ray-layer code records on its node's export port.
"""

from metapeft_ray.core.metrics import use_runtime_backend
from metapeft_ray.on_ray.metrics import RayBackend

use_runtime_backend(RayBackend())
