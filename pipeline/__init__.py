"""converse-pipeline: a director model writes roles, the roles converse, every stage is saved.

One module per concept; ARCHITECTURE.md (at the top of the repository) shows the data
flow and what each module owns. ``cli`` is a thin layer over the library.
"""

from .errors import PipelineError

__version__ = "0.1.0"

__all__ = ["PipelineError", "__version__"]
