"""Hourglass shortening (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language Models").

A span of middle layers runs on a sequence shortened k times:

1. shift the full-length states right by k - 1 and pool each group of k (a projection of the concatenated
   group, or the mean): shortened token j holds positions jk - k + 1 .. jk, so it never sees a later token;
2. run the shortened layers on the shortened tokens, at shortened positions 0, 1, 2, ...;
3. upsample: the token at position t reads shortened token t // k (which ends at or before t) through a
   linear map, and adds it to the residual from before shortening.

Groups are counted from each row's own position 0 (its first real token), so a left-padded row shortens
exactly as it does alone. Decoding is exact: a shortened token is computed once, at the step its group
completes; the tokens in between read the last one, and the incomplete group waits in the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .cache_sonett import SonettHourglassState
from .configuration_sonett import SonettConfig


class ShortenedPlacement(NamedTuple):
    """Where one run of the shortened layers sits in this call's `(batch, width)` layout of shortened tokens."""

    rows: torch.Tensor  # (n,)
    columns: torch.Tensor  # (C,)
    batch: int
    width: int


# (states (n, C, hidden), 2-D padding mask (n, past + C) or None, positions (n, C), cache or None, placement)
#   -> (n, C, hidden)
RunShortened = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, object, ShortenedPlacement], torch.Tensor]


class SonettUpsampleProjection(nn.Linear):
    """The hourglass's upsampling map, shortened outputs -> full-length additions. Its own type so that
    `SonettPreTrainedModel._init_weights` starts it at zero: a new hourglass first passes the full-length stream
    through unchanged and lets the shortened path grow in, instead of adding a normalised random vector many times
    larger than the early residual stream."""


class SonettHourglass(nn.Module):
    """Shortening, the shortened span (run through a callback) and upsampling."""

    def __init__(self, config: SonettConfig) -> None:
        super().__init__()
        settings = config.hierarchy_settings
        self.shorten_factor = settings.shorten_factor
        self.pooling = settings.pooling
        hidden = config.hidden_size
        if self.pooling == "linear":
            self.shorten_proj = nn.Linear(self.shorten_factor * hidden, hidden, bias=False)
        self.upsampling = settings.upsampling
        slots = self.shorten_factor if self.upsampling == "linear" else 1
        self.upsample_proj = SonettUpsampleProjection(hidden, slots * hidden, bias=False)  # starts at zero

    def upsample(self, outputs: torch.Tensor) -> torch.Tensor:
        """Shortened outputs `(batch, C, hidden)` -> what each of a group's k positions adds, `(batch, C, k, hidden)`.

        `repeat`: one linear map, the same vector for all k positions; `linear`: a map per position in the group.
        """
        batch, width, hidden = outputs.shape
        projected = self.upsample_proj(outputs)
        if self.upsampling == "linear":
            return projected.view(batch, width, self.shorten_factor, hidden)
        return projected[:, :, None].expand(batch, width, self.shorten_factor, hidden)

    def pool(self, groups: torch.Tensor) -> torch.Tensor:
        """groups `(batch, C, k, hidden)` -> shortened tokens `(batch, C, hidden)`."""
        if self.pooling == "mean":
            return groups.mean(dim=2)
        return self.shorten_proj(groups.flatten(2))

    def grouping(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For positions `(batch, seq)`: the shortened token each is pooled into, its slot in that group (slot
        k - 1 completes it), and the shortened token it reads back. The shift by k - 1 makes group j hold
        positions jk - k + 1 .. jk, so position t can read group t // k without seeing a later token."""
        k = self.shorten_factor
        return (positions + k - 1) // k, (positions + k - 1) % k, positions // k

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        state: SonettHourglassState | None,
        run_shortened: RunShortened,
    ) -> torch.Tensor:
        """Shorten, run the shortened layers, upsample and add back.

        Args:
            hidden_states: `(batch, seq, hidden)`, the residual stream before the shortened span.
            token_mask: `(batch, seq)` bool, True for real tokens (None: all real).
            position_ids: `(batch, seq)`, each token's position in its own sequence (consecutive over real tokens).
            state: the cache's hourglass state (updated in place), or None without a cache.
            run_shortened: runs the shortened layers (see `RunShortened`).

        Returns:
            `(batch, seq, hidden)`: the residual stream after the span.
        """
        k = self.shorten_factor
        batch, seq, hidden = hidden_states.shape
        device = hidden_states.device
        positions = position_ids.to(device).long().expand(batch, seq)
        real = torch.ones(batch, seq, dtype=torch.bool, device=device) if token_mask is None else token_mask.bool()
        check_consecutive(positions, real)

        group, slot, read_group = self.grouping(positions)
        never = torch.iinfo(torch.long).max
        first_group = torch.where(real, group, never).amin(dim=1)  # (batch,)
        counts = (real & (slot == k - 1)).sum(dim=1)  # complete groups per row in this call
        width = int(counts.max())
        # Left-padded layout: row b's complete groups fill columns width - counts[b] .. width - 1; a trailing
        # incomplete group goes to the extra column `width` and becomes the new buffer.
        column = width - counts[:, None] + (group - first_group[:, None])

        rows = torch.arange(batch, device=device)
        groups = hidden_states.new_zeros(batch, width + 1, k, hidden)
        if state is not None and state.buffer is not None:
            groups[rows, width - counts, : k - 1] = state.buffer.to(groups.dtype)
        groups = groups.index_put((rows[:, None].expand(-1, seq)[real], column[real], slot[real]), hidden_states[real])
        shortened = self.pool(groups[:, :width])
        offsets = torch.arange(width, device=device)[None, :] - (width - counts[:, None])  # (batch, width)
        shortened_mask = offsets >= 0
        shortened_positions = torch.where(shortened_mask, first_group[:, None] + offsets, 0)

        if width == 0:
            outputs = shortened
        elif state is None:
            padding = None if bool(shortened_mask.all()) else shortened_mask.long()
            placement = ShortenedPlacement(rows, torch.arange(width, device=device), batch, width)
            outputs = run_shortened(shortened, padding, shortened_positions, None, placement)
        else:
            outputs = self._run_cohorts(
                state, shortened, shortened_mask, shortened_positions, counts, real, positions, run_shortened
            )
        outputs = outputs.to(device)  # the span's last layer may sit on another device (device_map)
        upsampled = self.upsample(outputs)  # (batch, width, k, hidden)

        last = hidden_states.new_zeros(batch, 1, k, hidden)
        if state is not None and state.last_coarse is not None:
            last = state.last_coarse[:, None].to(last.dtype)
        # Position t reads shortened token t // k (the last one of an earlier call at index 0, or one of this
        # call), at its place t - k * (t // k) in the group.
        read = read_group - first_group[:, None]
        index = torch.where(read < 0, 0, 1 + width - counts[:, None] + read).clamp(0, width)
        place = (positions - k * read_group).clamp(0, k - 1)
        table = torch.cat([last, upsampled], dim=1).flatten(1, 2)  # (batch, (1 + width) * k, hidden)
        added = table.gather(1, (index * k + place)[..., None].expand(-1, -1, hidden)) * real[..., None]

        if state is not None:
            state.buffer = groups[:, width, : k - 1].detach().clone()  # not a view that keeps `groups` alive
            if width > 0:
                last = torch.where((counts > 0)[:, None, None, None], upsampled[:, -1:], last)
            state.last_coarse = last[:, 0].detach()
        return hidden_states + added

    @staticmethod
    def _run_cohorts(
        state: SonettHourglassState,
        shortened: torch.Tensor,
        shortened_mask: torch.Tensor,
        shortened_positions: torch.Tensor,
        counts: torch.Tensor,
        real: torch.Tensor,
        positions: torch.Tensor,
        run_shortened: RunShortened,
    ) -> torch.Tensor:
        """Run the shortened layers once per cohort of rows whose groups complete together; new rows form cohorts."""
        batch, width, _ = shortened.shape
        k = state.shorten_factor
        device = shortened.device
        outputs = torch.zeros_like(shortened)
        new_rows = (~state.assigned_rows(batch, device)) & real.any(dim=1)
        if bool(new_rows.any()):
            # The step (mod k) at which a row completes its groups: same for all rows of one new cohort.
            steps = torch.arange(real.shape[1], device=device).expand_as(positions)
            first = torch.where(real, steps, real.shape[1]).argmin(dim=1)
            phase = (first - positions[torch.arange(batch, device=device), first]) % k
            for value in phase[new_rows].unique().tolist():
                members = (new_rows & (phase == value)).nonzero().squeeze(-1)
                state.new_cohort(members)
        for cohort in state.cohorts:
            members = cohort.rows.to(device)
            own = counts[members]
            fresh = cohort.length == 0
            if not fresh and bool((own != own[0]).any()):
                raise ValueError(
                    "The hierarchy cache expects padding only on the left: rows that started together now complete "
                    "their groups at different steps. Pass an attention_mask whose zeros all come before the "
                    "first real token of each row."
                )
            used = int(own.max())
            if used == 0:
                continue
            if fresh:  # rows with fewer groups are left-padded in the cohort's shortened stream, once
                cohort.padding = (used - own).to(cohort.padding.device)
            cohort.length += used
            columns = torch.arange(width - used, width, device=device)
            mask = cohort.mask().to(device)
            out = run_shortened(
                shortened[members][:, columns],
                None if bool(mask.all()) else mask.long(),
                shortened_positions[members][:, columns],
                cohort.cache,
                ShortenedPlacement(members, columns, batch, width),
            )
            outputs = outputs.index_put((members[:, None], columns[None, :]), out.to(outputs.device))
        return outputs


def check_consecutive(positions: torch.Tensor, real: torch.Tensor) -> None:
    """Raise a ValueError unless the real tokens of every row sit at consecutive positions."""
    never = torch.iinfo(torch.long).max
    first = torch.where(real, positions, never).amin(dim=1, keepdim=True)
    expected = first + real.long().cumsum(dim=1) - 1
    if bool(((positions != expected) & real).any()):
        raise ValueError(
            "A hierarchy (hourglass) needs the real tokens of each row at consecutive positions; got position_ids "
            "that skip or restart (packed sequences?). Pass one sequence per row, padded on one side only."
        )


__all__ = ["ShortenedPlacement", "SonettHourglass", "SonettUpsampleProjection", "check_consecutive"]
