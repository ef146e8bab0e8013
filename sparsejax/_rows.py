"""A loop over the rows of a layer in fixed-size chunks, for the matmul and the rewiring."""

from __future__ import annotations

from typing import Callable, TypeVar

from jax import lax

Carry = TypeVar("Carry")


def over_row_chunks(body: Callable[[int, int, Carry], Carry], out: int, chunk: int,
                    carry: Carry) -> Carry:
  """Runs ``carry = body(start, size, carry)`` over rows ``[0, out)`` in chunks.

  Full chunks go through one ``fori_loop`` (compiled once, ``start`` traced,
  ``size = chunk``); a ragged tail gets its own call with the static size
  ``out % chunk``.

  Arguments:
    body: ``(start, size, carry) -> carry`` for rows ``[start, start + size)``.
    out: number of rows.
    chunk: rows per full chunk, ``>= 1``.
    carry: the initial loop state.

  Returns:
    The final carry.
  """
  full, tail = divmod(out, chunk)
  carry = lax.fori_loop(0, full, lambda c, carry: body(c * chunk, chunk, carry), carry)
  return body(full * chunk, tail, carry) if tail else carry
