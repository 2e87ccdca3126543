"""Models: transformer layers, the DiT teacher, the ARD student, masks M1-M4, the KV cache, the discriminator.

Imports only ``ardistill.sampling`` (the student's ``ode_step`` output uses the process).
"""
