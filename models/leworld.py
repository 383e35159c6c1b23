"""LeWorld: a bit memory, small router models (SLMs) that address it, and a big model (BLM) that predicts states.

Shapes: ``B`` batch, ``M`` SLMs (memory slots), ``N`` memory words, ``W`` bits per word, ``S`` state size.

Addresses. A start address is a word index in ``[0, N)``, written as a high and a low "byte"
(``start = hi * lo_size + lo``; 256 x 256 for 65,536 words, 64 x 64 for 4,096). A range is ``[start, end)`` with
``1 <= end - start <= max_read_range``. Ranges that the SLMs produce are always valid: the length comes from a
``max_read_range``-way head and the end is clamped to ``N`` (a range at the top of memory is shorter).
Ranges given by a caller to :meth:`ArtificialMemory.read` or :meth:`ArtificialMemory.range_mean` are checked and
rejected with a ``ValueError`` (``clamp=True`` clamps them instead: start to ``[0, N - 1]``, end to
``[start + 1, min(N, start + max_read_range)]``).

The two byte heads give a factorised distribution ``p(hi) p(lo)`` (seed bug 5): enough here, where every target is a
single range, but it cannot express "either A or B" across high bytes; product-key memory (Lample et al., 2019)
scores the halves jointly and keeps the top pairs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

InfoMode = Literal["always", "never", "sample", "greedy"]


def address_split(num_words: int) -> tuple[int, int]:
    """``(hi_size, lo_size)`` with ``hi_size * lo_size == num_words``; ``num_words`` must be a power of two."""
    if num_words < 4 or num_words & (num_words - 1):
        raise ValueError(f"num_words must be a power of two >= 4, got {num_words}")
    bits = num_words.bit_length() - 1
    hi = 1 << ((bits + 1) // 2)
    return hi, num_words // hi


def centered_prefix(bits: Tensor) -> Tensor:
    """``P[i] = sum_{k < i} (bits[k] - 1/2)``, shape ``[N + 1, W]``: a range holds ``P[e] - P[s] + (e - s) / 2`` ones.

    Bits are 0/1, so the sums are multiples of 1/2 and exact in float32 up to 2^23 words.
    """
    centered = bits.float() - 0.5
    return torch.cat([centered.new_zeros(1, centered.shape[1]), centered.cumsum(0)])


def prefix_range_mean(prefix: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
    """Mean bit of words ``[start, end)`` for index tensors of any (equal) shape; returns ``[..., W]``. O(1) each."""
    length = (ends - starts).unsqueeze(-1).to(prefix.dtype)
    ones = prefix[ends] - prefix[starts] + 0.5 * length  # the exact count of 1 bits
    return ones / length  # the same rounding as slicing and ``mean``


class ArtificialMemory(nn.Module):
    """A store of ``num_words`` x ``word_size`` bits with batched range reads, a soft read and a write path.

    The bits are a buffer (saved in checkpoints, never trained); the ``bit_encoder`` that turns a read into a
    vector and the ``write_proj`` that turns a vector into bits are trained. Every read of a range goes through a
    prefix sum over the memory, so the mean of a range costs O(1) whatever its length.
    """

    def __init__(self, num_words: int = 4096, word_size: int = 32, max_read_range: int = 32, d_read: int = 32) -> None:
        """
        Args:
            num_words: Words in memory (a power of two).
            word_size: Bits per word.
            max_read_range: Longest range a read may cover.
            d_read: Size of the learned encoding of a read.
        """
        super().__init__()
        self.hi_size, self.lo_size = address_split(num_words)
        if word_size < 1 or not 1 <= max_read_range <= num_words:
            raise ValueError(
                f"need word_size >= 1 and 1 <= max_read_range <= num_words, got {word_size}, {max_read_range}"
            )
        self.num_words, self.word_size, self.max_read_range, self.d_read = num_words, word_size, max_read_range, d_read
        self.register_buffer("bits", torch.zeros(num_words, word_size))
        self.bit_encoder = nn.Sequential(nn.Linear(word_size + 1, d_read), nn.GELU(), nn.Linear(d_read, d_read))
        self.write_proj = nn.Linear(d_read, word_size)
        self._prefix: Tensor | None = None
        self._prefix_key: tuple | None = None

    # --- contents ---------------------------------------------------------------------------------------------
    def load_bits(self, bits: Tensor) -> None:
        """Replace the whole memory (``[num_words, word_size]`` of 0/1 values)."""
        if tuple(bits.shape) != (self.num_words, self.word_size):
            raise ValueError(f"bits must have shape {(self.num_words, self.word_size)}, got {tuple(bits.shape)}")
        if not torch.all((bits == 0) | (bits == 1)):
            raise ValueError("memory bits must be 0 or 1")
        self.bits.copy_(bits.to(self.bits))
        self._prefix = None

    @property
    def prefix(self) -> Tensor:
        """Centered prefix sums of the bits, recomputed when the bits change (``load_bits``, ``write``, a load)."""
        key = (self.bits.data_ptr(), self.bits._version, self.bits.device)
        if self._prefix is None or self._prefix_key != key:
            self._prefix = centered_prefix(self.bits)
            self._prefix_key = key
        return self._prefix

    # --- checks -----------------------------------------------------------------------------------------------
    def check_range(self, starts: Tensor, ends: Tensor, clamp: bool = False) -> tuple[Tensor, Tensor]:
        """Valid ``(starts, ends)``; out-of-range values raise ``ValueError`` or, with ``clamp``, are clamped."""
        starts, ends = starts.long(), ends.long()
        if clamp:
            starts = starts.clamp(0, self.num_words - 1)
            ends = torch.minimum(
                torch.maximum(ends, starts + 1), (starts + self.max_read_range).clamp(max=self.num_words)
            )
            return starts, ends
        if starts.numel() and (int(starts.min()) < 0 or int(ends.max()) > self.num_words):
            raise ValueError(f"memory range out of bounds: starts must be >= 0 and ends <= {self.num_words}")
        length = ends - starts
        if length.numel() and (int(length.min()) < 1 or int(length.max()) > self.max_read_range):
            raise ValueError(
                f"memory range length must be in [1, {self.max_read_range}], got [{int(length.min())}, "
                f"{int(length.max())}]"
            )
        return starts, ends

    # --- reads ------------------------------------------------------------------------------------------------
    def range_mean(self, starts: Tensor, ends: Tensor, clamp: bool = False) -> Tensor:
        """Mean bit of each range ``[start, end)`` (index tensors of any shape) -> ``[..., W]``, batched, O(1) each."""
        starts, ends = self.check_range(starts, ends, clamp)
        return prefix_range_mean(self.prefix, starts, ends)

    def range_mean_loop(self, starts: Tensor, ends: Tensor) -> Tensor:
        """The same as :meth:`range_mean`, slicing one range at a time (the reference; the benchmark's baseline)."""
        flat_s, flat_e = starts.reshape(-1).tolist(), ends.reshape(-1).tolist()
        rows = [self.bits[s:e].mean(0) for s, e in zip(flat_s, flat_e)]
        return torch.stack(rows).reshape(*starts.shape, self.word_size)

    def encode(self, mean_bits: Tensor, lengths: Tensor) -> Tensor:
        """Learned encoding of a read from its mean bits (mapped to [-1, 1]) and its relative length."""
        rel = (lengths.to(mean_bits.dtype) / self.max_read_range).unsqueeze(-1)
        return self.bit_encoder(torch.cat([2 * mean_bits - 1, rel], -1))

    def read(self, starts: Tensor, ends: Tensor, clamp: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Read ranges ``[start, end)`` for a batch ``[B]``.

        Returns ``(block, encoded, mask)``: the words ``[B, max_read_range, W]`` (zero past the end), the learned
        encoding of the block ``[B, d_read]`` and the mask of real words ``[B, max_read_range]``. One gather for the
        batch; the encoding uses the O(1) prefix-sum mean.
        """
        starts, ends = self.check_range(starts, ends, clamp)
        offsets = torch.arange(self.max_read_range, device=starts.device)
        index = starts.unsqueeze(-1) + offsets
        mask = index < ends.unsqueeze(-1)
        block = self.bits[index.clamp(max=self.num_words - 1)] * mask.unsqueeze(-1)
        encoded = self.encode(prefix_range_mean(self.prefix, starts, ends), ends - starts)
        return block, encoded, mask

    def soft_start_mean(self, start_probs: Tensor, lengths: Tensor) -> Tensor:
        """Expected range mean when the start is drawn from ``start_probs`` ``[B, N]`` and the length is fixed ``[B]``.

        Exact: ``sum_s p(s) mean[s, min(s + L, N))``, computed without materialising the ``[B, N, W]`` window means:
        ``sum_s q(s) (P[e_s] - P[s])`` with ``q(s) = p(s) / (e_s - s)``, two matrix products with the prefix sums.
        A one-hot ``start_probs`` gives the hard read (up to float rounding).
        """
        n = self.num_words
        s = torch.arange(n, device=start_probs.device)
        e = torch.minimum(s.unsqueeze(0) + lengths.long().unsqueeze(-1), torch.tensor(n, device=s.device))  # [B, N]
        q = start_probs / (e - s).to(start_probs.dtype)
        at_end = torch.zeros(start_probs.shape[0], n + 1, device=q.device, dtype=q.dtype).scatter_add_(1, e, q)
        prefix = self.prefix.to(q.dtype)
        return 0.5 + at_end @ prefix - q @ prefix[:n]

    def soft_length_mean(self, starts: Tensor, length_probs: Tensor) -> Tensor:
        """Expected range mean for a fixed start ``[B]`` and lengths ``1..max_read_range`` drawn from ``[B, R]``."""
        lengths = torch.arange(1, self.max_read_range + 1, device=starts.device)
        ends = (starts.long().unsqueeze(-1) + lengths).clamp(max=self.num_words)  # [B, R]
        means = prefix_range_mean(self.prefix, starts.long().unsqueeze(-1).expand_as(ends), ends)  # [B, R, W]
        return torch.einsum("br,brw->bw", length_probs.to(means.dtype), means)

    # --- writes -----------------------------------------------------------------------------------------------
    def write(self, starts: Tensor, values: Tensor) -> Tensor:
        """Write one word per row: ``values [B, d_read]`` -> bit probabilities -> bits stored at ``starts [B]``.

        Returns the written bits with a straight-through gradient (forward: the hard 0/1 bits; backward: the
        probabilities), so a loss on what was written trains ``write_proj``. The stored bits carry no gradient.
        Later rows win when two rows write the same address.
        """
        starts, _ = self.check_range(starts, starts + 1)
        probs = torch.sigmoid(self.write_proj(values))
        hard = (probs > 0.5).to(probs.dtype)
        with torch.no_grad():
            self.bits[starts] = hard.to(self.bits.dtype)
        self._prefix = None
        return hard + (probs - probs.detach())


class SmallLeWorldModel(nn.Module):
    """SLM: reads (past state, current state, characteristics, info modulation) and outputs a memory range.

    A small transformer over five tokens (past, current, characteristics, their joint projection, and the BLM's
    info modulation); the pooled vector feeds a high-byte head, a low-byte head, a range-length head and a
    confidence head. Hard addresses are the argmaxes.
    """

    def __init__(
        self,
        state_dim: int = 64,
        char_dim: int = 32,
        d_model: int = 64,
        num_layers: int = 1,
        num_heads: int = 4,
        hi_size: int = 64,
        lo_size: int = 64,
        max_read_range: int = 32,
        dropout: float = 0.0,
    ) -> None:
        """
        Args:
            state_dim: Size of a state.
            char_dim: Size of the characteristics vector.
            d_model: Transformer width.
            num_layers: Transformer layers.
            num_heads: Attention heads.
            hi_size: Classes of the high address byte.
            lo_size: Classes of the low address byte (``hi_size * lo_size`` memory words).
            max_read_range: Classes of the range-length head (longest read).
            dropout: Transformer dropout.
        """
        super().__init__()
        self.hi_size, self.lo_size, self.max_read_range = hi_size, lo_size, max_read_range
        self.num_words = hi_size * lo_size
        self.d_model = d_model
        self.past_in = nn.Linear(state_dim, d_model)
        self.current_in = nn.Linear(state_dim, d_model)
        self.char_in = nn.Linear(char_dim, d_model)
        self.joint_in = nn.Sequential(
            nn.Linear(2 * state_dim + char_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )
        self.no_info = nn.Parameter(torch.zeros(d_model))
        self.type_embed = nn.Parameter(torch.randn(5, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.hi_head = nn.Linear(d_model, hi_size)
        self.lo_head = nn.Linear(d_model, lo_size)
        self.range_head = nn.Linear(d_model, max_read_range)
        self.confidence_head = nn.Linear(d_model, 1)

    def forward(
        self, past: Tensor, current: Tensor, chars: Tensor, modulation: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``modulation [B, d_model]`` comes from the info bridge (``None``: a learned "no request" token)."""
        if modulation is None:
            modulation = self.no_info.expand(past.shape[0], -1)
        tokens = (
            torch.stack(
                [
                    self.past_in(past),
                    self.current_in(current),
                    self.char_in(chars),
                    self.joint_in(torch.cat([past, current, chars], -1)),
                    modulation,
                ],
                1,
            )
            + self.type_embed
        )
        hidden = self.norm(self.encoder(tokens).mean(1))
        hi_logits, lo_logits = self.hi_head(hidden), self.lo_head(hidden)
        range_logits = self.range_head(hidden)
        start = hi_logits.argmax(-1) * self.lo_size + lo_logits.argmax(-1)
        end = (start + range_logits.argmax(-1) + 1).clamp(max=self.num_words)
        return {
            "start_logits_high": hi_logits,
            "start_logits_low": lo_logits,
            "range_logits": range_logits,
            "start_addr": start,
            "end_addr": end,
            "confidence": torch.sigmoid(self.confidence_head(hidden)).squeeze(-1),
            "hidden": hidden,
        }


class Router(nn.Module):
    """Multi-hot gate over the SLMs: ``sigmoid(logit / T)``, hard 0/1 forward, straight-through backward.

    The temperature ``T`` anneals as ``max(t_min, t0 * exp(-rate * step))`` (:meth:`anneal_temperature`).
    """

    def __init__(self, d_in: int, d_hidden: int, t0: float = 1.0) -> None:
        """
        Args:
            d_in: Size of a slot's routing features.
            d_hidden: Hidden width of the gate MLP.
            t0: Initial temperature.
        """
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, 1))
        nn.init.constant_(self.net[-1].bias, 1.0)  # start with every SLM on
        self.t0 = t0
        self.register_buffer("temperature", torch.tensor(float(t0)))

    def anneal_temperature(self, step: int, rate: float, t_min: float) -> None:
        self.temperature.fill_(max(t_min, self.t0 * math.exp(-rate * step)))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``features [B, M, d_in]`` -> ``(mask, probs, logits)``, each ``[B, M]``; ``mask`` is 0/1 with ST gradient."""
        logits = self.net(features).squeeze(-1)
        probs = torch.sigmoid(logits / self.temperature)
        hard = (probs > 0.5).to(probs.dtype)
        return hard + (probs - probs.detach()), probs, logits


class BigLeWorldModel(nn.Module):
    """BLM: predicts the next state from past and current state and, when given, one token per memory slot.

    A slot token carries the SLM's hidden state, the encoded read, the range (start / N, length / max) and the
    confidence; the router multiplies each slot token by its 0/1 gate. ``num_slots=0`` is the no-memory BLM.
    The next state is predicted as ``current + delta``, ``delta`` = a head on the transformer's summary token plus
    a linear map of the inputs (past, current, routed slot features). The info-request head emits a query (and a
    request logit, used by Phase 3's request gate) for the next step's SLMs.
    """

    def __init__(
        self,
        state_dim: int = 64,
        num_slots: int = 0,
        slot_hidden: int = 64,
        d_read: int = 32,
        d_model: int = 96,
        num_layers: int = 2,
        num_heads: int = 4,
        info_dim: int = 32,
        dropout: float = 0.0,
    ) -> None:
        """
        Args:
            state_dim: Size of a state.
            num_slots: Memory slots (one per SLM; 0: the no-memory BLM).
            slot_hidden: Size of the SLM hidden state in a slot token.
            d_read: Size of the encoded read in a slot token.
            d_model: Transformer width.
            num_layers: Transformer layers.
            num_heads: Attention heads.
            info_dim: Size of the info query.
            dropout: Transformer dropout.
        """
        super().__init__()
        self.num_slots, self.slot_hidden, self.info_dim = num_slots, slot_hidden, info_dim
        self.past_in = nn.Linear(state_dim, d_model)
        self.current_in = nn.Linear(state_dim, d_model)
        self.cls = nn.Parameter(torch.randn(d_model) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(3 + num_slots, d_model) * 0.02)
        slot_in = slot_hidden + d_read + 3
        if num_slots:
            self.slot_in = nn.Sequential(nn.Linear(slot_in, d_model), nn.GELU(), nn.Linear(d_model, d_model))
            self.router = Router(2 * state_dim + slot_in, d_model)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.next_state_head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, state_dim))
        # A linear path from the inputs (past, current, the routed slots) to the change of state, beside the
        # transformer: linear dynamics need no attention to be expressed.
        self.linear_skip = nn.Linear(2 * state_dim + num_slots * slot_in, state_dim)
        self.info_request = nn.Linear(d_model, info_dim + 1)

    def slot_features(
        self,
        hidden: Tensor,
        reads: Tensor,
        starts: Tensor,
        lengths: Tensor,
        confidence: Tensor,
        num_words: int,
        max_read_range: int,
    ) -> Tensor:
        """Concatenated per-slot inputs ``[B, M, slot_hidden + d_read + 3]``."""
        position = torch.stack([starts.float() / num_words, lengths.float() / max_read_range, confidence], -1)
        return torch.cat([hidden, reads, position.to(reads.dtype)], -1)

    def route(self, past: Tensor, current: Tensor, router_slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The router's ``(mask, probs, logits)`` ``[B, M]`` from the states and each slot's features."""
        features = torch.cat([past, current], -1).unsqueeze(1).expand(-1, router_slots.shape[1], -1)
        return self.router(torch.cat([features, router_slots], -1))

    def forward(
        self,
        past: Tensor,
        current: Tensor,
        slots: Tensor | None = None,
        mask: Tensor | None = None,
        router_slots: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``slots [B, M, *]`` from :meth:`slot_features`; ``mask [B, M]`` overrides the router (oracle, Phase 1);
        ``router_slots`` (default ``slots``) are what the router sees."""
        tokens = [self.cls.expand(past.shape[0], -1), self.past_in(past), self.current_in(current)]
        skip_in = [past, current]
        out: dict[str, Tensor] = {}
        if self.num_slots:
            if slots is None:
                raise ValueError("this BLM has memory slots: pass `slots`")
            if mask is None:
                mask, probs, logits = self.route(past, current, slots if router_slots is None else router_slots)
                out |= {"route_probs": probs, "route_logits": logits}
            out["mask"] = mask
            slot_tokens = self.slot_in(slots) * mask.unsqueeze(-1)
            tokens += list(slot_tokens.unbind(1))
            skip_in.append((slots * mask.unsqueeze(-1)).flatten(1))
        x = torch.stack(tokens, 1) + self.type_embed[: len(tokens)]
        pooled = self.norm(self.encoder(x)[:, 0])
        request = self.info_request(pooled)
        out |= {
            "next_state": current + self.next_state_head(pooled) + self.linear_skip(torch.cat(skip_in, -1)),
            "info_query": request[:, :-1],
            "request_logit": request[:, -1],
        }
        return out


class LeWorldSystem(nn.Module):
    """Memory + SLMs + BLM + the info bridge (``info_to_slm``: BLM query -> SLM modulation for the next step).

    One step (:meth:`forward`): every SLM proposes a range, the memory reads it (the forward value is the exact hard
    read; the gradient comes from the soft reads over the start and the length distributions, straight-through),
    the BLM routes over the slots and predicts the next state. :meth:`multi_step_forward` rolls over a sequence.
    """

    def __init__(
        self,
        state_dim: int = 64,
        char_dim: int = 32,
        num_slms: int = 3,
        num_words: int = 4096,
        word_size: int = 32,
        max_read_range: int = 32,
        d_read: int = 32,
        slm_d_model: int = 64,
        slm_layers: int = 1,
        slm_heads: int = 4,
        blm_d_model: int = 96,
        blm_layers: int = 2,
        blm_heads: int = 4,
        info_dim: int = 32,
        straight_through_reads: bool = True,
        blm_sees_slm_hidden: bool = True,
        slm_sees_past: bool = True,
    ) -> None:
        """
        Args:
            state_dim: Size of a state.
            char_dim: Size of the characteristics vector.
            num_slms: Number of SLMs (memory slots).
            num_words: Memory words (a power of two).
            word_size: Bits per word.
            max_read_range: Longest read.
            d_read: Size of the learned read encoding.
            slm_d_model: SLM width.
            slm_layers: SLM transformer layers.
            slm_heads: SLM attention heads.
            blm_d_model: BLM width.
            blm_layers: BLM transformer layers.
            blm_heads: BLM attention heads.
            info_dim: Size of the BLM's info query.
            straight_through_reads: Pass gradients to the address logits through the soft reads (false: hard reads
                only, no gradient reaches the addresses).
            blm_sees_slm_hidden: Give the BLM's slot tokens the SLMs' hidden states (false: zeros; the router sees
                them either way). The hidden state encodes the address, through which the BLM can memorise the
                training memory's contents instead of reading them.
            slm_sees_past: Give the SLMs the past state (false: zeros, so an SLM sees one state and cannot tell the
                direction of a transition; the ``latent`` task's regime then reaches it only through the info query).
        """
        super().__init__()
        if num_slms < 1:
            raise ValueError(f"num_slms must be >= 1, got {num_slms}")
        self.memory = ArtificialMemory(num_words, word_size, max_read_range, d_read)
        hi, lo = self.memory.hi_size, self.memory.lo_size
        self.slms = nn.ModuleList(
            SmallLeWorldModel(state_dim, char_dim, slm_d_model, slm_layers, slm_heads, hi, lo, max_read_range)
            for _ in range(num_slms)
        )
        self.blm = BigLeWorldModel(
            state_dim, num_slms, slm_d_model, d_read, blm_d_model, blm_layers, blm_heads, info_dim
        )
        self.info_to_slm = nn.Sequential(
            nn.Linear(info_dim, slm_d_model), nn.GELU(), nn.Linear(slm_d_model, slm_d_model)
        )
        self.num_slms, self.state_dim, self.char_dim = num_slms, state_dim, char_dim
        self.straight_through_reads = straight_through_reads
        self.blm_sees_slm_hidden = blm_sees_slm_hidden
        self.slm_sees_past = slm_sees_past
        self.read_impl: Literal["batched", "loop"] = "batched"

    # --- pieces -----------------------------------------------------------------------------------------------
    def slm_past(self, past: Tensor) -> Tensor:
        """The past state as the SLMs see it (zeros unless ``slm_sees_past``)."""
        return past if self.slm_sees_past else torch.zeros_like(past)

    def _run_slms(
        self, past: Tensor, current: Tensor, chars: Tensor, info_query: Tensor | None, request: Tensor | None
    ) -> list[dict[str, Tensor]]:
        outs, past = [], self.slm_past(past)
        mod = None if info_query is None else self.info_to_slm(info_query)
        for slm in self.slms:
            m = mod
            if mod is not None and request is not None:
                r = request.unsqueeze(-1).to(mod.dtype)
                m = r * mod + (1 - r) * slm.no_info
            outs.append(slm(past, current, chars, m))
        return outs

    def read_slot(self, out: dict[str, Tensor]) -> Tensor:
        """Read one SLM's range: exact hard read forward, soft-read gradient to the address logits backward."""
        memory = self.memory
        start, end = out["start_addr"], out["end_addr"]
        if self.read_impl == "loop":
            hard = memory.range_mean_loop(start, end)
        else:
            hard = prefix_range_mean(memory.prefix, start, end)
        mean = hard
        if self.straight_through_reads and torch.is_grad_enabled():
            p_hi = torch.softmax(out["start_logits_high"].float(), -1)
            p_lo = torch.softmax(out["start_logits_low"].float(), -1)
            p_start = (p_hi.unsqueeze(-1) * p_lo.unsqueeze(-2)).flatten(1)
            p_len = torch.softmax(out["range_logits"].float(), -1)
            if self.read_impl == "loop":
                soft_s = self._soft_start_loop(p_start, end - start)
            else:
                soft_s = memory.soft_start_mean(p_start, end - start)
            soft_l = memory.soft_length_mean(start, p_len)
            mean = hard + (soft_s - soft_s.detach()) + (soft_l - soft_l.detach())
        return memory.encode(mean.to(hard.dtype), end - start)

    def _soft_start_loop(self, p_start: Tensor, lengths: Tensor) -> Tensor:
        """Per-sample reference of :meth:`ArtificialMemory.soft_start_mean` (all window means of one sample)."""
        bits, n = self.memory.bits, self.memory.num_words
        rows = []
        for p, length in zip(p_start, lengths.tolist()):
            windows = torch.stack([bits[s : min(s + length, n)].mean(0) for s in range(n)]) if n <= 512 else None
            if windows is None:  # large memories: cumulative sums per sample, still one sample at a time
                c = torch.cat([bits.new_zeros(1, bits.shape[1]), bits.cumsum(0)])
                s = torch.arange(n, device=bits.device)
                e = (s + length).clamp(max=n)
                windows = (c[e] - c[s]) / (e - s).unsqueeze(-1)
            rows.append(p @ windows)
        return torch.stack(rows)

    def slot_hidden(self, hidden: Tensor) -> Tensor:
        """The SLM hidden states as the BLM sees them (zeros unless ``blm_sees_slm_hidden``)."""
        return hidden if self.blm_sees_slm_hidden else torch.zeros_like(hidden)

    def slot_inputs(
        self, hidden: Tensor, reads: Tensor, starts: Tensor, ends: Tensor, confidence: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The slot features the BLM sees (hidden states per :meth:`slot_hidden`) and those the router sees (always
        the SLM hidden states), each ``[B, M, *]``."""
        args = (reads, starts, ends - starts, confidence, self.memory.num_words, self.memory.max_read_range)
        return self.blm.slot_features(self.slot_hidden(hidden), *args), self.blm.slot_features(hidden, *args)

    def oracle_reads(self, starts: Tensor, ends: Tensor) -> Tensor:
        """Encoded reads of given ranges ``[B, M]`` -> ``[B, M, d_read]``."""
        mean = self.memory.range_mean(starts, ends)
        return self.memory.encode(mean, ends - starts)

    # --- one step ---------------------------------------------------------------------------------------------
    def forward(
        self,
        past: Tensor,
        current: Tensor,
        chars: Tensor,
        info_query_prev: Tensor | None = None,
        request: Tensor | None = None,
        oracle: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> dict:
        """One step. ``oracle = (starts, ends, valid)`` (each ``[B, M]``) reads the true ranges and routes to the valid
        slots instead of using the SLMs' ranges and the router. Returns the prediction, routing mask and gate
        probabilities, info query and request logit, and the SLM outputs (the losses are the training modules')."""
        slm_outs = self._run_slms(past, current, chars, info_query_prev, request)
        stack = {k: torch.stack([o[k] for o in slm_outs], 1) for k in slm_outs[0]}
        if oracle is None:
            reads = torch.stack([self.read_slot(o) for o in slm_outs], 1)
            starts, ends, mask = stack["start_addr"], stack["end_addr"], None
            confidence = stack["confidence"]
        else:
            starts, ends, valid = oracle
            reads = self.oracle_reads(starts, ends)
            mask, confidence = valid.to(reads.dtype), torch.ones_like(stack["confidence"])
        slots, router_slots = self.slot_inputs(stack["hidden"], reads, starts, ends, confidence)
        blm_out = self.blm(past, current, slots, mask, router_slots)
        return {
            "prediction": blm_out["next_state"],
            "mask": blm_out["mask"],
            "info_query": blm_out["info_query"],
            "request_logit": blm_out["request_logit"],
            "route_probs": blm_out.get("route_probs"),
            "slm": stack,
        }

    # --- a sequence -------------------------------------------------------------------------------------------
    def multi_step_forward(
        self,
        states: Tensor,
        chars: Tensor,
        n_steps: int | None = None,
        info: InfoMode = "always",
        open_loop: bool = False,
        oracle: tuple[Tensor, Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """Roll through ``states [B, T, S]``: step ``t`` sees states ``t - 1`` (``t`` at the first step) and ``t`` and
        predicts ``t + 1``, for ``n_steps`` steps (default ``T - 1``).

        ``open_loop`` feeds predictions back as the current state (per-horizon error); otherwise the true states are
        the inputs (teacher forcing). ``info``: ``always`` passes the BLM's query to the next step, ``never`` passes
        none, ``sample`` / ``greedy`` pass it when the request gate (a Bernoulli of ``request_logit``) says so.
        ``oracle = (starts, ends, valid)`` with ``[B, T, M]`` ranges.
        Returns predictions ``[B, n, S]``, masks ``[B, n, M]``, ranges ``[B, n, M]``, per-sample squared error
        ``[B, n]``, request decisions and their log-probabilities ``[B, n]``, and ``steps``: each step's output
        (:meth:`forward`), from which the training modules compute their losses.
        """
        if info not in ("always", "never", "sample", "greedy"):
            raise ValueError(f"unknown info mode {info!r}")
        total_steps = states.shape[1] - 1
        n = total_steps if n_steps is None else n_steps
        if not 1 <= n <= total_steps:
            raise ValueError(f"n_steps must be in [1, {total_steps}] for sequences of {states.shape[1]} states")
        past, current = states[:, 0], states[:, 0]
        query, request = None, None
        keys = ("prediction", "mask", "sq_error", "request", "request_log_prob", "start", "end")
        rec: dict[str, list[Tensor]] = {k: [] for k in keys}
        steps = []
        for t in range(n):
            step_oracle = None if oracle is None else (oracle[0][:, t], oracle[1][:, t], oracle[2])
            out = self(past, current, chars, query if info != "never" else None, request, step_oracle)
            steps.append(out)
            pred = out["prediction"]
            rec["prediction"].append(pred)
            rec["mask"].append(out["mask"])
            rec["sq_error"].append(((pred.float() - states[:, t + 1].float()) ** 2).mean(-1))
            rec["start"].append(out["slm"]["start_addr"])
            rec["end"].append(out["slm"]["end_addr"])
            query = out["info_query"]
            logit = out["request_logit"].float()
            if info == "sample":
                # A NaN logit (non-finite weights: the step is rolled back) must not crash the sampling.
                request = torch.bernoulli(torch.sigmoid(logit).detach().nan_to_num(0.0), generator=generator)
            elif info == "greedy":
                request = (logit > 0).float()
            elif info == "always":
                request = torch.ones_like(logit)
            else:
                request = torch.zeros_like(logit)
            rec["request"].append(request)
            rec["request_log_prob"].append(-F.binary_cross_entropy_with_logits(logit, request, reduction="none"))
            if info == "always":
                request = None  # the query itself, without the gate
            past = current
            current = pred if open_loop else states[:, t + 1]
        result = {k: torch.stack(v, 1) for k, v in rec.items()}
        result.update(steps=steps, predictions=result["prediction"], masks=result["mask"])
        return result


def blm_only_step(
    blm: BigLeWorldModel,
    memory: ArtificialMemory | None,
    past: Tensor,
    current: Tensor,
    oracle: tuple[Tensor, Tensor, Tensor] | None,
) -> Tensor:
    """Next-state prediction of a baseline BLM: no memory (``memory``/``oracle`` None) or oracle reads of the true
    ranges (``oracle = (starts, ends, valid)``, each ``[B, M]``; zero hidden state, confidence 1)."""
    if oracle is None:
        return blm(past, current)["next_state"]
    starts, ends, valid = oracle
    reads = memory.encode(memory.range_mean(starts, ends), ends - starts)
    hidden = reads.new_zeros(*starts.shape, blm.slot_hidden)
    slots = blm.slot_features(
        hidden,
        reads,
        starts,
        ends - starts,
        torch.ones_like(valid, dtype=reads.dtype),
        memory.num_words,
        memory.max_read_range,
    )
    return blm(past, current, slots, valid.to(reads.dtype))["next_state"]
