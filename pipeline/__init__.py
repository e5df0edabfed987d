"""converse-pipeline: a director model writes roles, the roles converse, every stage is saved.

The library is organised one module per concept: ``config`` (endpoints),
``client`` (the only place that talks to models), ``local`` (the embedded
server), ``templates``, ``schemas``, ``runs`` (run folders and manifests),
``director`` and ``dialogue`` (the stages). ``cli`` is a thin layer over them.
"""

from .errors import PipelineError

__version__ = "0.1.0"

__all__ = ["PipelineError", "__version__"]
