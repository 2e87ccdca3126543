"""Teacher-relabelled on-policy targets (DAgger-style; beyond the paper).

On-policy history (``DistillConfig.on_policy_prob``) feeds the student its own free-running states
x^_1..x^_{S-1} as the inputs of blocks 1..S-1. With ``on_policy_targets = "recorded"`` (the default,
and what the ARD paper's on-policy discussion implies) the targets stay the teacher's recorded states
x_2..x_S: the student learns to jump from *its* state back onto the *teacher's* trajectory. With
``"teacher"`` each target is relabelled: the teacher's ODE is run from the student's own state x^_k
at student time t_k to t_{k+1}, on the recording's grid with its solver (and Heun's last interval, the
manifest's ``heun_last_step``) and guidance, as DAgger asks the expert what to do in the states the
learner visits. Block 0 (input: the recorded noise) keeps its recorded target, which the relabelling
would reproduce exactly.

Cost: one on-policy batch runs ``teacher_steps * (S - 1) / S`` extra teacher evaluations (twice the
batch under guidance), in fp32 and without gradient.
"""

from __future__ import annotations

import torch

from ardistill.sampling.diffusion import make_process
from ardistill.sampling.ode import recorded_heun_last_step, solve_segment

RELABEL_TARGETS = ("recorded", "teacher")


class TeacherRelabeler:
    """Targets of the teacher's ODE from the inputs' states (blocks 1..S-1) to the next student time.

    Args:
        teacher: the recording's teacher (DiT or TextDiT), on the training device.
        manifest: the recording's manifest (grid positions, solver, guidance, process).
        null_text: the prompt store's trimmed empty prompt (1, T, C), (1, T), for a text recording.
    """

    def __init__(self, teacher: torch.nn.Module, manifest: dict, null_text: tuple[torch.Tensor, torch.Tensor] | None = None):
        from ardistill.sampling.guidance import make_model_fn, make_text_model_fn
        sampler = manifest["sampler"]
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        proc = dict(sampler["process"])
        self.process = make_process(proc.pop("kind"), **proc)
        self.solver = sampler["solver"]
        self.heun_last_step = recorded_heun_last_step(sampler)  # older Heun manifests: the Euler last step
        self.teacher_steps = int(manifest["grid"]["teacher_steps"])
        self.positions = [int(p) for p in manifest["grid"]["positions"]]
        self.text = null_text is not None
        if self.text:
            dev = next(teacher.parameters()).device
            self.model_fn = make_text_model_fn(teacher, null_text[0].to(dev), null_text[1].to(dev),
                                               float(sampler["cfg_scale"]))
        else:
            self.model_fn = make_model_fn(teacher, float(sampler["cfg_scale"]), sampler.get("guidance_channels"))

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """New targets (B, S, C, H, W): block 0's recorded target, blocks k >= 1 the teacher's ODE from
        ``inputs[:, k]`` (grid position p_k) to p_{k+1}. ``cond``: (labels,) or (caption tokens, mask)."""
        S = inputs.shape[1]
        if S + 1 != len(self.positions):
            raise ValueError(f"relabel: the inputs have S = {S} blocks, the recording's grid {len(self.positions) - 1}")
        y = cond if self.text else cond[0]
        out = targets.clone()
        with torch.autocast(inputs.device.type, enabled=False):  # the recording's numerics (fp32)
            for k in range(1, S):
                x = solve_segment(self.model_fn, self.process, inputs[:, k].float(), y, self.teacher_steps,
                                  self.solver, self.positions[k], self.positions[k + 1], self.heun_last_step)
                out[:, k] = x.to(out.dtype)
        return out
