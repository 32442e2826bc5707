"""The server's step of DP-FedSGD under secure aggregation with distributed noise
(privacy/dp_fedsgd.py, docs/aggregation.md): the decoded noisy mean gradient goes through
the family's optimizer (Adam, the step's lr and betas, as a site's DP-SGD round uses),
whose state the server owns and checkpoints with the model (server/checkpoint.py)."""

from __future__ import annotations

import numpy as np
import torch

from fedgen.privacy.dp_fedsgd import private_step_parameters, the_private_step
from fedgen.shared_models import DPSGDTrainable

#: the key of the optimizer's tensors in a checkpoint's strategy section
CHECKPOINT_KEY = "dp_fedsgd_optimizer"


class ServerOptimizer:
    """Adam over the global model's private-step parameters, stepped once a round."""

    def __init__(self, model: DPSGDTrainable, *, lr: float) -> None:
        step = the_private_step(model)
        self.params = private_step_parameters(model)
        self.optimizer = torch.optim.Adam(self.params, lr=step.lr or lr, betas=step.betas)

    def step(self, gradient: np.ndarray) -> None:
        """One optimizer step on the flat ``gradient`` (the order of ``private_step_parameters``)."""
        flat = torch.from_numpy(np.ascontiguousarray(gradient))
        if flat.numel() != sum(p.numel() for p in self.params):
            raise ValueError(f"a gradient of {flat.numel()} values for {sum(p.numel() for p in self.params)} parameters")
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].reshape(p.shape).to(p.dtype).to(p.device)
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer's state as named tensors (a checkpoint holds tensors only)."""
        out = {}
        for i, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"{i}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, v in tensors.items():
            i, k = name.split(".", 1)
            state.setdefault(int(i), {})[k] = v.clone()
        if not set(state) <= set(range(len(self.params))) or any(
                v.shape not in (self.params[i].shape, torch.Size([])) for i, st in state.items() for v in st.values()):
            raise ValueError("the optimizer state does not fit the model")  # else Adam fails in a later round
        full = self.optimizer.state_dict()
        full["state"] = state
        self.optimizer.load_state_dict(full)
