"""OpenLPU: a software LPU — compiler, static-schedule simulator, runtime and server."""

__version__ = "0.1.0"
