"""moe-planner: hardware-aware deployment planning for Mixture-of-Experts inference.

This package holds the decisions (placement ILP, baselines, the Plan type) and the CLI,
the only place that wires profiles/, simulator/ and exporters/ together.
"""

__version__ = "0.1.0"
