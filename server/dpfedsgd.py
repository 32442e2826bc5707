"""The server's step of DP-FedSGD under secure aggregation with distributed noise
(privacy/dp_fedsgd.py, docs/aggregation.md): the decoded noisy mean gradient goes through
the family's optimizer (Adam, the step's lr and betas, as a site's DP-SGD round uses), then
the server runs the family's steps that see no data (a GAN's generator step: fresh z, the
updated discriminator; post-processing) as a site's local loop would. The optimizers' state
is the server's, checkpointed with the model (server/checkpoint.py)."""

from __future__ import annotations

import numpy as np
import torch

from fedgen.privacy.dp_fedsgd import private_step_parameters, public_steps, the_private_step
from fedgen.shared_models import Batch, DPSGDTrainable

#: the key of the optimizer's tensors in a checkpoint's strategy section
CHECKPOINT_KEY = "dp_fedsgd_optimizer"


class ServerOptimizer:
    """Adam over the global model's private-step parameters, stepped once a round on the
    decoded gradient, and one Adam per step that sees no data, run after it."""

    def __init__(self, model: DPSGDTrainable, *, lr: float, batch_size: int) -> None:
        step = the_private_step(model)
        self.model, self.batch_size = model, batch_size
        self.params = private_step_parameters(model)
        self.optimizer = torch.optim.Adam(self.params, lr=step.lr or lr, betas=step.betas)
        self.public = [(s, torch.optim.Adam(s.module.parameters(), lr=s.lr or lr, betas=s.betas))
                       for s in public_steps(model)]

    def step(self, gradient: np.ndarray, *, seed: int = 0) -> None:
        """One optimizer step on the flat ``gradient`` (the order of ``private_step_parameters``),
        then each step that sees no data on ``batch_size`` draws of its own (a GAN's z and
        labels), from the torch generator seeded with ``seed`` (the round's: a resumed run
        takes the same steps; these draws carry no site data)."""
        flat = torch.from_numpy(np.ascontiguousarray(gradient))
        if flat.numel() != sum(p.numel() for p in self.params):
            raise ValueError(f"a gradient of {flat.numel()} values for {sum(p.numel() for p in self.params)} parameters")
        self.model.zero_grad(set_to_none=True)
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].reshape(p.shape).to(p.dtype).to(p.device)
            offset += p.numel()
        self.optimizer.step()
        device = self.model.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for step, optimizer in self.public:  # as the local loop runs a step that sees no data
                self.model.zero_grad(set_to_none=True)
                step.loss(Batch(x=None, y=None, size=self.batch_size)).mean().backward()
                optimizer.step()
        self.model.zero_grad(set_to_none=True)

    @property
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + [opt for _, opt in self.public]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizers' state as named tensors (a checkpoint holds tensors only):
        ``"param.key"`` for the private step's, ``"step/param.key"`` for the others'."""
        out = {}
        for j, optimizer in enumerate(self._optimizers):
            prefix = f"{j}/" if j else ""
            for i, st in optimizer.state_dict()["state"].items():
                for k, v in st.items():
                    out[f"{prefix}{i}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        optimizers = self._optimizers
        states: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in optimizers]
        try:
            for name, v in tensors.items():
                j, rest = name.split("/", 1) if "/" in name else ("0", name)
                i, k = rest.split(".", 1)
                states[int(j)].setdefault(int(i), {})[k] = v.clone()
        except (ValueError, IndexError):
            raise ValueError("the optimizer state does not fit the model") from None
        for optimizer, state in zip(optimizers, states):
            params = optimizer.param_groups[0]["params"]
            if not set(state) <= set(range(len(params))) or any(
                    v.shape not in (params[i].shape, torch.Size([])) for i, st in state.items() for v in st.values()):
                raise ValueError("the optimizer state does not fit the model")  # else Adam fails in a later round
            full = optimizer.state_dict()
            full["state"] = state
            optimizer.load_state_dict(full)
