"""What the server's wrappers learn about a round, kept until the round's row is written.

One :class:`RoundNotes` per run is created first (``fedseg/server/compose.py``) and handed, at
construction, to every part that reports on a round: the update guard and the codec decoder note the
updates they reject, the SecAgg+ secure sum notes what it decoded, the SecAgg+ fit round notes the
bytes the protocol carried, and the round recorder reads the rejections and merges every note into
the round's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SecureSum:
    """What the secure-sum decoding saw of one SecAgg+ round."""

    examples: list[int]  # each surviving vehicle's example count, as Flower handed the unmasked sum on
    aggregated: bool  # whether the strategy made a new global model of it
    rejected: str | None = None  # why the sum was not applied, when the secure sum's checks refused it


class RoundNotes:
    """Per-round notes: row fields (:meth:`annotate`, :meth:`reject`, taken by :meth:`pop`) and the
    outcome of each SecAgg+ round's secure sum (:meth:`note_secure_sum`, :meth:`secure_sum`)."""

    def __init__(self) -> None:
        self._fields: dict[int, dict[str, Any]] = {}
        self._sums: dict[int, SecureSum] = {}

    def annotate(self, server_round: int, fields: dict[str, Any]) -> None:
        """Fields for the row of ``server_round``; they win over the recorder's own (e.g. the bytes
        SecAgg+ really carried)."""
        self._fields.setdefault(server_round, {}).update(fields)

    def reject(self, server_round: int, rejected: list[dict[str, Any]], *, kept: int) -> None:
        """Updates left out of ``server_round`` (``{"vehicle", "reason"}`` each) and how many are kept.
        The guard and the decoder both report: the rejections add up, the last count kept wins (the
        guard's, innermost)."""
        fields = self._fields.setdefault(server_round, {})
        fields["rejected"] = [*fields.get("rejected", []), *rejected]
        fields["clients"] = kept

    def rejected(self, server_round: int) -> list[dict[str, Any]]:
        """The updates rejected so far in ``server_round``."""
        return list(self._fields.get(server_round, {}).get("rejected", []))

    def note_secure_sum(self, server_round: int, outcome: SecureSum | None) -> None:
        """What the secure sum of ``server_round`` saw (None: a round just opened, nothing seen yet)."""
        if outcome is None:
            self._sums.pop(server_round, None)
        else:
            self._sums[server_round] = outcome

    def secure_sum(self, server_round: int) -> SecureSum | None:
        """The secure sum's outcome of ``server_round``; None if Flower never handed it a sum."""
        return self._sums.get(server_round)

    def pop(self, server_round: int) -> dict[str, Any]:
        """The row fields of ``server_round``, forgetting the round."""
        self._sums.pop(server_round, None)
        return self._fields.pop(server_round, {})
