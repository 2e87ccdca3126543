"""Sampling: the diffusion processes (VP, flow; eps <-> x0 <-> velocity), guidance and the ODE solvers.

The bottom of the package: imports nothing else from ardistill.
"""
