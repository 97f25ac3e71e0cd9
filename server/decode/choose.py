"""Token choice after a model call: the one owner of "pick inside ONNX Runtime or in numpy".

Prefill and decode steps both end in the same question — given the model's last logits and
each row's sampling parameters, which token comes next — so both call `TokenChooser.run`.
When the model carries the decode head (server/decode_head.py) the choice happens inside
the same ORT call, with the GIL released; otherwise log-softmax and the draw run in numpy.
Both follow server/sampling.py exactly and consume the same uniforms, so they pick the same
tokens (tests/unit/server/test_decode_head.py, tests/integration/server/test_generate.py).
"""

from __future__ import annotations

import numpy as np

from rnnserve.server.decode_head import RowParams
from rnnserve.server.runtime import OnnxModel, State, log_softmax
from rnnserve.server.sampling import SamplingParams, draw_rows

GREEDY = SamplingParams()


class TokenChooser:
    """Runs one model call and picks one token per row."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.vocab = len(model.manifest.vocab)

    def params(self, rows: list[SamplingParams]) -> RowParams | None:
        """What the decode head needs for these rows (None without a head); a batch keeps it
        until its rows change."""
        return RowParams.of(rows, self.vocab) if self.model.has_head else None

    def run(
        self,
        x: np.ndarray,
        state: State,
        rows: list[SamplingParams],
        uniforms: np.ndarray,
        head: RowParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray, State]:
        """x [rows, time] from `state` -> (each row's next token [rows] int64, its logprob
        under the unfiltered model [rows] float32, state after x).

        `rows[i]` is how row i chooses (GREEDY for a row whose token is thrown away, e.g. a
        prompt that is not finished yet); `uniforms[i]` is its next uniform (ignored for
        greedy rows). `head` is `params(rows)` when the caller has it already."""
        if self.model.has_head:
            head = head or RowParams.of(rows, self.vocab)
            return self.model.decode(x, state, head, uniforms)
        logits, state = self.model.run(x, state)  # [rows, time, vocab]
        lp = log_softmax(logits[:, -1, :])
        tokens = np.argmax(lp, axis=-1)  # ties to the lowest id
        sampled = [i for i, p in enumerate(rows) if not p.greedy]
        if sampled:
            tokens[sampled] = draw_rows(lp[sampled], [rows[i] for i in sampled], uniforms[sampled])
        return tokens, lp[np.arange(len(tokens)), tokens], state
