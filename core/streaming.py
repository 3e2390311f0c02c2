"""Training pairs computed on the fly from a model and token rows (nothing touches disk), with the same
shuffled batches as the activation cache (core.batches)."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from core import activations as capture
from core.activations import HOOK_IN, HOOK_OUT
from core.batches import BUFFER_BYTES, PairBatches, positive


class StreamingPairSource(PairBatches):
    """One layer's pairs computed on the fly from a model and token rows; nothing touches disk.

    Same interface as storage.shards.PairSource (read, batches, num_batches, n_tokens, ...). Token t
    is row t // tokens_per_row, position t % tokens_per_row (+1 when BOS is dropped). A shuffle block
    is `batch_rows` whole rows, so each block read is exactly one forward pass.
    """

    def __init__(
        self,
        model: HookedTransformer,
        tokens: Int[Tensor, "row pos"] | np.ndarray,
        layer: int,
        drop_bos: bool = True,
        batch_rows: int = 8,
        hook_in: str = HOOK_IN,
        hook_out: str = HOOK_OUT,
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        tokens = torch.as_tensor(tokens)
        capture.check_capture(model, [layer], hook_in, hook_out, tokens, drop_bos)
        self.model, self.tokens, self.layer, self.drop_bos = model, tokens, layer, drop_bos
        self.batch_rows = positive(batch_rows, "batch_rows")
        self.hook_in, self.hook_out = capture.hook_names(layer, hook_in, hook_out)
        self._templates = (hook_in, hook_out)
        self.tokens_per_row = capture.tokens_per_row(tokens.shape[1], drop_bos)
        self.n_tokens = tokens.shape[0] * self.tokens_per_row
        self.d_in, self.d_out = capture.pair_dims(model, [layer], hook_in, hook_out)[layer]
        self.block_tokens = self.tokens_per_row * self.batch_rows
        self.buffer_bytes = buffer_bytes

    def read(self, start: int, stop: int) -> tuple[Float[Tensor, "token d_in"], Float[Tensor, "token d_out"]]:
        """Pairs of tokens [start, stop) as float32 on the CPU (computes the rows they lie in)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise ValueError(f"read({start}, {stop}) is outside 0..{self.n_tokens}")
        first, last = start // self.tokens_per_row, -(-stop // self.tokens_per_row)
        n_rows_tokens = (last - first) * self.tokens_per_row
        buffers = capture.allocate_pairs(n_rows_tokens, self.d_in, self.d_out, [self.layer], torch.float32)
        capture.capture_rows(
            self.model, self.tokens[first:last], buffers, self.batch_rows, self.drop_bos, *self._templates
        )
        offset = first * self.tokens_per_row
        pair = buffers[self.layer]
        return pair.mlp_in[start - offset : stop - offset], pair.mlp_out[start - offset : stop - offset]
