"""From-scratch RNN, GRU and LSTM cells: the textbook equations with a Python loop over time.

Why: they show what torch.nn computes and are checked against it weight for weight
(tests/unit/trainer/test_scratch.py). Row-vector convention, X [batch, in] @ W [in, hidden]:

    RNN   H_t = tanh(X_t W_xh + b_xh + H_{t-1} W_hh + b_hh)
    GRU   R = σ(X W_xr + b_xr + H W_hr + b_hr)          reset gate
          Z = σ(X W_xz + b_xz + H W_hz + b_hz)          update gate
          textbook (d2l, Cho et al. 2014), reset BEFORE the recurrent product:
              H~ = tanh(X W_xh + b_xh + (R ⊙ H) W_hh + b_hh)
          torch.nn.GRU (cuDNN), reset AFTER the recurrent product:
              H~ = tanh(X W_xh + b_xh + R ⊙ (H W_hh + b_hh))
          H_t = Z ⊙ H_{t-1} + (1 - Z) ⊙ H~
    LSTM  I, F, O = σ(X W_x* + b_x* + H W_h* + b_h*);  C~ = tanh(X W_xc + b_xc + H W_hc + b_hc)
          C_t = F ⊙ C_{t-1} + I ⊙ C~;  H_t = O ⊙ tanh(C_t)

Each gate has an input bias and a recurrent bias, as in torch; with the reset gate before the
product they add up to the textbook's single b_h. `reset_after=True` selects torch's variant.
The stacks take and return the same tensors as nn.RNN/GRU/LSTM(batch_first=True).
"""

from __future__ import annotations

import torch
from torch import nn

GATES = {"rnn": ("h",), "gru": ("r", "z", "h"), "lstm": ("i", "f", "c", "o")}
# torch.nn packs gate rows in this order: RNN (h), GRU (r, z, n), LSTM (i, f, g, o)
TORCH_ORDER = {"rnn": ("h",), "gru": ("r", "z", "h"), "lstm": ("i", "f", "c", "o")}


class ScratchLayer(nn.Module):
    """One layer of one cell type: W_x<g> [in, hidden], W_h<g> [hidden, hidden], biases."""

    def __init__(self, arch: str, input_size: int, hidden: int, reset_after: bool = True):
        super().__init__()
        self.arch, self.hidden, self.reset_after = arch, hidden, reset_after
        scale = hidden**-0.5
        for g in GATES[arch]:
            self.register_parameter(
                f"W_x{g}", nn.Parameter(torch.randn(input_size, hidden) * scale)
            )
            self.register_parameter(f"W_h{g}", nn.Parameter(torch.randn(hidden, hidden) * scale))
            self.register_parameter(f"b_x{g}", nn.Parameter(torch.zeros(hidden)))
            self.register_parameter(f"b_h{g}", nn.Parameter(torch.zeros(hidden)))

    def _x(self, g: str, x: torch.Tensor) -> torch.Tensor:
        return x @ getattr(self, f"W_x{g}") + getattr(self, f"b_x{g}")

    def _h(self, g: str, h: torch.Tensor) -> torch.Tensor:
        return h @ getattr(self, f"W_h{g}") + getattr(self, f"b_h{g}")

    def step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None):
        """One time step; x [batch, in], h and c [batch, hidden]."""
        if self.arch == "rnn":
            return torch.tanh(self._x("h", x) + self._h("h", h)), None
        if self.arch == "gru":
            r = torch.sigmoid(self._x("r", x) + self._h("r", h))
            z = torch.sigmoid(self._x("z", x) + self._h("z", h))
            if self.reset_after:  # torch.nn.GRU
                cand = torch.tanh(self._x("h", x) + r * self._h("h", h))
            else:  # textbook
                cand = torch.tanh(self._x("h", x) + self._h("h", r * h))
            return z * h + (1 - z) * cand, None
        i = torch.sigmoid(self._x("i", x) + self._h("i", h))
        f = torch.sigmoid(self._x("f", x) + self._h("f", h))
        o = torch.sigmoid(self._x("o", x) + self._h("o", h))
        cand = torch.tanh(self._x("c", x) + self._h("c", h))
        assert c is not None
        c = f * c + i * cand
        return o * torch.tanh(c), c


class ScratchStack(nn.Module):
    """L stacked scratch layers with nn.RNN/GRU/LSTM's batch_first call signature."""

    def __init__(self, arch: str, input_size: int, hidden: int, layers: int = 1,
                 reset_after: bool = True):  # fmt: skip
        super().__init__()
        self.arch = arch
        self.layers = nn.ModuleList(
            ScratchLayer(arch, input_size if i == 0 else hidden, hidden, reset_after)
            for i in range(layers)
        )

    def forward(self, x: torch.Tensor, state):
        """x [batch, time, in]; state h (or (h, c)) [layers, batch, hidden]."""
        h0, c0 = state if self.arch == "lstm" else (state, None)
        hs, cs = [], []
        for li, layer in enumerate(self.layers):
            h = h0[li]
            c = c0[li] if c0 is not None else None
            outs = []
            for t in range(x.shape[1]):  # the textbook loop over time
                h, c = layer.step(x[:, t], h, c)
                outs.append(h)
            x = torch.stack(outs, dim=1)  # [batch, time, hidden]: next layer's input
            hs.append(h)
            cs.append(c)
        h_n = torch.stack(hs)  # [layers, batch, hidden]
        if self.arch == "lstm":
            return x, (h_n, torch.stack(cs))
        return x, h_n

    @torch.no_grad()
    def load_from_torch(self, module: nn.RNNBase) -> ScratchStack:
        """Copies nn.RNN/GRU/LSTM weights (rows packed per gate) into the textbook matrices."""
        order = TORCH_ORDER[self.arch]
        for li, layer in enumerate(self.layers):
            tensors = {
                "W_x": getattr(module, f"weight_ih_l{li}"),
                "W_h": getattr(module, f"weight_hh_l{li}"),
                "b_x": getattr(module, f"bias_ih_l{li}"),
                "b_h": getattr(module, f"bias_hh_l{li}"),
            }
            for prefix, packed in tensors.items():
                for g, chunk in zip(order, packed.chunk(len(order), dim=0), strict=True):
                    target = getattr(layer, f"{prefix}{g}")
                    target.copy_(chunk.T if prefix.startswith("W") else chunk)
        return self


def scratch_lm(config, reset_after: bool = True):
    """An RNNLM whose recurrent stack is the scratch one (same embedding/head, same API)."""
    from rnnserve.trainer.models import RNNLM

    model = RNNLM(config)
    model.rnn = ScratchStack(config.arch, config.embed, config.hidden, config.layers, reset_after)
    return model
