"""Word-level language models. Both take tokens shaped ``[T, B]`` (as produced by
``lowbit.data.lm_batches``) and return ``(logits [T, B, vocab], state)``; pass the returned
state back in for the next BPTT window (the LSTM's is ``(h, c)``; the Transformer has none)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

LSTMState = tuple[torch.Tensor, torch.Tensor]


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> multi-layer LSTM -> dropout -> Linear decoder."""

    def __init__(
        self, vocab_size: int, embed_dim: int, hidden: int, layers: int, dropout: float,
        tie_weights: bool,
    ) -> None:
        super().__init__()
        if tie_weights and embed_dim != hidden:
            raise ValueError(
                f"lstm_lm: tie_weights needs embed_dim == hidden, got {embed_dim} != {hidden}"
            )
        self.vocab_size, self.hidden, self.layers = vocab_size, hidden, layers
        self.encoder = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(embed_dim, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def init_state(self, batch_size: int) -> LSTMState:
        """Zero (h, c) for a batch."""
        w = self.decoder.weight
        shape = (self.layers, batch_size, self.hidden)
        return (w.new_zeros(shape), w.new_zeros(shape))

    def forward(
        self, tokens: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        x = self.drop(self.encoder(tokens))
        out, state = self.rnn(x, state)
        return self.decoder(self.drop(out)), state


@register_model
def lstm_lm(
    num_classes: int = 10000,
    vocab_size: int | None = None,
    embed_dim: int | None = None,
    hidden: int = 200,
    layers: int = 2,
    dropout: float = 0.2,
    tie_weights: bool = False,
) -> nn.Module:
    """LSTM word language model (Zaremba et al. style). Vocabulary size is ``vocab_size`` or
    ``num_classes``; ``embed_dim`` defaults to ``hidden``."""
    vocab = int(vocab_size if vocab_size is not None else num_classes)
    return LSTMLanguageModel(vocab, int(embed_dim or hidden), int(hidden), int(layers),
                             float(dropout), bool(tie_weights))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask; separate q/k/v/out Linear layers."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % heads != 0:
            raise ValueError(f"transformer_lm: d_model {d_model} not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: attention and a GELU MLP, each residual."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))


class TransformerLanguageModel(nn.Module):
    """Small causal (GPT-style) Transformer LM with learned positions.

    Every projection is a plain ``nn.Linear`` (``blocks.N.attn.{q,k,v,out}``,
    ``blocks.N.fc1``, ``blocks.N.fc2``, ``decoder``), so :func:`lowbit.nn.convert` quantizes
    them all; the two attention products inside ``scaled_dot_product_attention``
    (``q k^T`` and ``softmax(.) v``), the embeddings and the LayerNorms stay in float. The
    first layer is the embedding lookup (no GEMM): convert's first/last rule, which picks
    the first and last Linear by registration order, would keep ``blocks.0.attn.q`` in
    float, so keep the decoder in float with an override instead::

        convert(model, "fp8", first_last="same", overrides={"decoder": "fp32"})
    """

    def __init__(
        self, vocab_size: int, d_model: int, layers: int, heads: int, d_ff: int, dropout: float,
        max_len: int, tie_weights: bool,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.encoder = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:  # scaled residual projections (GPT-2)
            for lin in (blk.attn.out, blk.fc2):
                nn.init.normal_(lin.weight, 0.0, 0.02 / math.sqrt(2 * layers))
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def forward(
        self, tokens: torch.Tensor, state: None = None
    ) -> tuple[torch.Tensor, None]:
        t = tokens.shape[0]
        if t > self.max_len:
            raise ValueError(f"transformer_lm: sequence length {t} exceeds max_len {self.max_len}")
        x = tokens.t()  # [B, T]
        pos = torch.arange(t, device=tokens.device)
        h = self.drop(self.encoder(x) + self.pos(pos))
        for blk in self.blocks:
            h = blk(h)
        return self.decoder(self.ln_f(h)).transpose(0, 1), None


@register_model
def transformer_lm(
    num_classes: int = 10000,
    vocab_size: int | None = None,
    d_model: int = 128,
    layers: int = 2,
    heads: int = 4,
    d_ff: int | None = None,
    dropout: float = 0.1,
    max_len: int = 256,
    tie_weights: bool = False,
) -> nn.Module:
    """Small causal Transformer LM; vocabulary size is ``vocab_size`` or ``num_classes``."""
    vocab = int(vocab_size if vocab_size is not None else num_classes)
    return TransformerLanguageModel(vocab, int(d_model), int(layers), int(heads),
                                    int(d_ff or 4 * d_model), float(dropout), int(max_len),
                                    bool(tie_weights))
