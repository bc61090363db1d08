"""Pallas GPU kernel: flash attention over groups of query rows that share one KV sequence, for all the levels
of a Hydragen step in a single launch.

One kernel body serves both halves of Hydragen:

* shared (prefix) levels: every query of every sequence that reads a shared node, times the GQA group, times the
  query tokens, is a row of one matrix; a program takes `block_m` of those rows and streams the node's KV through
  the tensor cores, so each KV block is read once for `block_m` rows (inter-sequence batching);
* the per-sequence (suffix) level: a group is one sequence's T·g rows (the GQA heads of one KV head together;
  with few rows, those of several KV heads: `BlockConfig.heads`), and long keys are split over programs.

All levels of a step go into one launch on a 1-D grid. Interleaved (`_schedule`), each stretch of the grid mixes
the levels' programs, so the compute-bound prefix programs and the memory-bound suffix programs share the SMs and
overlap; in order, the first programs do the first level's work, the next ones the second level's, and so on.

Layout. Queries and outputs stay in their natural layout `[B, T, Hq, D]`, seen as rows `[B·T·Hq, D]`; no
transposes. In a level, group p takes the sequences order[seq_start[p]:] (row_count[p] = their number × T·heads·g
rows, ordered (sequence, token t, KV head i of the block, head j of the GQA group)) and reads KV row kv_index[p] of
the caches `k, v [R, S, Hkv, D]` (in place, no copy) up to kv_length[p] keys. For the block of `heads` KV heads
starting at h0, local row r is the query row ((seq·T + t)·Hq + (h0 + i)·g + j) with
seq = order[seq_start + r // (T·heads·g)] and (t, i, j) the digits of r % (T·heads·g): the kernel gathers and
scatters those rows itself. A level's programs are (group, KV head block, key split, row block). Each streams its
key range in blocks of `block_k` with the online softmax; a row sees no key past its length (nor, if causal, past
its own position) and an empty row gives out = 0, lse = -inf. KV rows and lengths are clamped to the caches' shape,
so an out-of-range traced value never reads outside them. With `splits > 1` each split writes its normalised
partial (in q's dtype) and its lse; `merge_states` combines them in float32, or, with `fused_levels(merge=True)`,
the launch itself: the program that completes a row's count of parts merges them (`_merge_if_last`).

Keys written by the launch (`LevelSpec.fresh`, `fused_levels`). A decode step appends its new keys and values
to each sequence's cache and then attends over them. On a per-sequence level the launch can do both: the last
new_count[b] keys of sequence b (positions [L - n, L), L its kv_length; position p is slot p - L + T of the
sequence's T query slots, right-aligned) are copied from the step's new k and v `[B·T, Hkv, D]` into the cache by
every program whose key range holds them, before a barrier and its reads (`_store_new`); the launch returns the
caches (aliased: in place where XLA can). A program reads only its own range, so it waits for no other; positions
at or past the capacity are neither stored nor read (as a scatter's dropped slots).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hydragen_jax.kernels import merge as merge_kernel

Array = jax.Array

# The online softmax's constants, shared by the Triton (here) and Mosaic (hopper.py) kernels. A row's running max
# before its first key: finite, so that exp2(m - m_new) never computes inf - inf. Masked scores are -inf:
# exp2(-inf · c - m_new) = 0 exactly, for any scale c > 0 and any row max. Scores are taken to base 2 (exp2 is the
# GPU's native exponential): q·k · scale · LOG2_E, and the log-sum-exp back to base e by LN_2.
M_START = -1e30
LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Static tiling of one level (all sizes powers of two, as Triton needs).

  Attributes:
    block_m: query rows per program (>= 16: the tensor-core minimum).
    block_k: keys per inner step.
    splits: programs that share one row block's keys (flash-decoding split).
    num_warps, num_stages: Triton launch parameters (a fused launch takes the most warps of its levels and the
      most stages that fit every level's shared memory, `ops._shared_stages`).
    heads: KV heads per program (a power of two dividing Hkv). With few rows per KV head (decode: T·g < 16)
      a program packs the rows of `heads` KV heads into one tile and reads those heads' keys together, as
      `block_k` columns of (key, head) pairs; a row's score against another head's key is masked. This wastes
      tensor-core work (free: decode is memory-bound) for `heads` times fewer, longer, contiguous programs.
  """

  block_m: int = 64
  block_k: int = 64
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 2
  heads: int = 1


@dataclasses.dataclass(frozen=True)
class LevelSpec:
  """Static description of one level's work: tiling, rows bound and masking.

  Two static shortcuts spare the kernel index loads (and the step the kernels that would build the index vectors):
  identity_order: order[i] = i (the level's groups take the sequences in their natural order);
  per_sequence: group p is sequence p alone, with max_rows rows, reading KV row kv_index[0] + p (then order,
  seq_start and row_count are not read).
  """

  block: BlockConfig
  max_rows: int  # bound on any group's row_count: sets the row blocks per group
  causal: bool
  identity_order: bool = False
  per_sequence: bool = False
  fresh: bool = False  # the level's last keys come from the step's new k, v and are stored (per_sequence levels)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LevelWork:
  """One level's arrays: groups of sequences and the KV they read.

  Attributes:
    k, v: `[R, S, Hkv, D]` KV rows, read in place.
    order: `[B]` the sequences, group by group.
    seq_start, row_count, kv_index, kv_length: `[G]` each: group p's first position in `order`, its rows
      (sequences × T·heads·g), its KV row and its valid keys. (With LevelSpec.per_sequence only kv_length is
      `[G]`: kv_index is `[1]`, the KV row of group 0, and order, seq_start, row_count are unused; with
      LevelSpec.identity_order, order is `[1]` and not read.)
    new_k, new_v, new_count: with LevelSpec.fresh, the step's new keys and values `[B, T, Hkv, D]` and `[B]` how
      many of sequence b's last slots are real: its keys at positions [kv_length - new_count, kv_length) (module
      docstring); None otherwise.
  """

  k: Array
  v: Array
  order: Array
  seq_start: Array
  row_count: Array
  kv_index: Array
  kv_length: Array
  new_k: Array | None = None
  new_v: Array | None = None
  new_count: Array | None = None


def padded_head_dim(head_dim: int) -> int:
  """The tiles' width for D: a power of two (Triton's tiles) and at least 16 (a tensor-core product's K)."""
  return max(16, pl.next_power_of_2(head_dim))


@dataclasses.dataclass(frozen=True)
class _Merge:
  """The launch's merge of its parts (`fused_levels(merge=True)`): a count of the parts written per query row, every
  level's parts `(out [splits, rows, D] ref, lse [splits, rows] ref)`, and the merged out `[rows, D]`, lse `[rows]`."""

  count: object
  parts: tuple
  out: object
  lse: object
  interpret: bool


def _merge_if_last(flat, row_ok, cols, col_ok, merge: _Merge):
  """Counts the part this program just wrote for each of its rows; for the rows whose count is then complete, merges
  every part of the row by log-sum-exp in float32 (`merge.merge_tiles`, as `reference.merge_states`) into the
  merged out and lse.

  The count is an atomic add (acquire-release, GPU scope), after a barrier that orders every thread's stores of the
  part before it. It is float32 (exact: counts stay far below 2^24): Pallas 0.11.2 lowers the atomic add of an int32
  tensor as a float add of its bits (its rule asks whether the value's type is an integer, which a tensor type is
  not), so integer counts never grow on the GPU (denormals, flushed to 0). Its returned old value is not used:
  Triton issues a tensor's atomic from one of the threads that hold an element (the others are masked off, their
  results undefined), so every thread reads the count again after a second barrier (volatile loads: from L2, no
  stale L1 copy). The program whose add completed a row's count sees it complete; a program whose add came just
  before may see it too and merge the row as well, writing the same values (every part is in place once the count
  is complete: each was stored before its add, and the merging program adds 0 to the complete counts, an acquire,
  before a barrier and its reads of the parts)."""
  total = sum(o.shape[0] for o, _ in merge.parts)
  barrier = (lambda: None) if merge.interpret else plgpu.debug_barrier  # the interpreter runs one thread

  def add(value, rows):  # `value` to the count of `rows`, then a barrier
    # Masked rows' flat index is one past the last row: the count has a spare slot there (the interpreter's atomic
    # takes no mask; on the GPU the mask skips them).
    plgpu.atomic_add(merge.count, flat, jnp.full(flat.shape, value, jnp.float32),
                     mask=None if merge.interpret else rows)
    barrier()

  barrier()
  add(1, row_ok)
  done = plgpu.load(merge.count.at[flat], mask=row_ok, other=0.0, volatile=True)
  last = row_ok & (done == total)

  @pl.when(jnp.max(last.astype(jnp.int32)) > 0)
  def _():
    # Adding 0 to the complete counts: an acquire (of the adds that completed them) before the other parts are read.
    add(0, last)
    tile = last[:, None] & col_ok[None, :]
    parts = [(o, l, i) for o, l in merge.parts for i in range(o.shape[0])]
    out, lse = merge_kernel.merge_tiles(
        [plgpu.load(l.at[i, flat], mask=last, other=-jnp.inf, volatile=True) for _, l, i in parts],
        lambda j: plgpu.load(parts[j][0].at[parts[j][2], flat[:, None], cols[None, :]], mask=tile, other=0,
                             volatile=True))
    plgpu.store(merge.out.at[flat[:, None], cols[None, :]], out.astype(merge.out.dtype), mask=tile)
    plgpu.store(merge.lse.at[flat], lse, mask=last)


@dataclasses.dataclass(frozen=True)
class _Fresh:
  """The refs of a level whose last keys the launch writes (`LevelSpec.fresh`): new_count `[B]`, the new k and v
  `[B·T, Hkv, D]`, and the caches as the launch's outputs (aliased with the level's k, v inputs)."""

  count: object
  k: object
  v: object
  k_out: object
  v_out: object
  interpret: bool


_STORE_ROWS = 16  # (slot, head) pairs `_store_new` copies at a time: a small tile whatever T


def _store_new(fresh: _Fresh, p, node, lo, hi, hb, heads: int, cols, col_ok, *, num_queries: int, full):
  """Stores sequence p's new keys and values that fall in [lo, hi) (a program's key range) for the KV heads
  [hb·heads, (hb + 1)·heads) into its cache row `node`, then a barrier, so that the program's own reads that follow
  see them. Its new keys are positions [L - n, L) (L = `full`, its unclamped length; n its count, at most T and L),
  position L - T + j taken from its query slot j. Every program that reads a new key stores it (row blocks of one
  range store the same values), so no program waits for another. The (slot, head) pairs go `_STORE_ROWS` at a time,
  over the program's own slots only (one step at decode)."""
  count = jnp.clip(fresh.count[p], 0, jnp.minimum(num_queries, jnp.maximum(full, 0)))
  base = full - num_queries  # position of slot 0
  first = jnp.maximum(jnp.maximum(lo - base, num_queries - count), 0)  # the program's new slots: [first, last)
  last = jnp.clip(hi - base, 0, num_queries)

  def chunk(c, carry):
    r = c * _STORE_ROWS + jnp.arange(_STORE_ROWS)
    slot, head = r // heads, hb * heads + r % heads
    ok = (slot >= first) & (slot < last)  # so lo <= position < hi <= capacity
    tile = ok[:, None] & col_ok[None, :]
    src = p * num_queries + jnp.where(ok, slot, 0)
    at = jnp.where(ok, base + slot, fresh.k_out.shape[1])  # masked rows point one past the capacity: no store lands
    for new_ref, out_ref in ((fresh.k, fresh.k_out), (fresh.v, fresh.v_out)):
      value = plgpu.load(new_ref.at[src[:, None], head[:, None], cols[None, :]], mask=tile, other=0)
      plgpu.store(out_ref.at[node, at[:, None], head[:, None], cols[None, :]], value, mask=tile)
    return carry

  if num_queries * heads <= _STORE_ROWS:  # decode: one tile holds every pair
    chunk(0, 0)
  else:
    lax.fori_loop(first * heads // _STORE_ROWS, pl.cdiv(last * heads, _STORE_ROWS), chunk, 0)
  if not fresh.interpret:  # the interpreter runs one thread
    plgpu.debug_barrier()


def _attend(ids, ints, q_ref, k_ref, v_ref, o_ref, lse_ref, *, spec: LevelSpec, head_dim: int, num_queries: int,
            group: int, scale: float, precision, merge: _Merge | None, fresh: _Fresh | None = None):
  """The work of one program: rows block `mb` of group `p`, KV heads block `hb`, key split `sp`; with `merge`, the
  program then merges the rows whose last part it wrote (`_merge_if_last`); with `fresh` (per-sequence levels),
  the program first stores the level's new keys of its range into the caches (`_store_new`), then reads them there
  with the others."""
  p, hb, sp, mb = ids
  seq_start_ref, row_count_ref, kv_index_ref, kv_len_ref, order_ref = ints
  block = spec.block
  heads = block.heads
  if spec.per_sequence:
    row_count, first_seq, node = spec.max_rows, p, kv_index_ref[0] + p
  else:
    row_count, first_seq, node = row_count_ref[p], seq_start_ref[p], kv_index_ref[p]
  # KV row and length clamped to the caches (a traced length or index may be out of range): no read outside k, v.
  node = jnp.clip(node, 0, k_ref.shape[0] - 1)
  first_local = mb * block.block_m

  @pl.when(first_local < row_count)
  def _():
    d_pad = padded_head_dim(head_dim)  # Triton tiles: pad D, mask the extra columns
    local = first_local + jnp.arange(block.block_m)
    row_ok = local < row_count
    cols = jnp.arange(d_pad)
    col_ok = cols < head_dim
    tile_ok = row_ok[:, None] & col_ok[None, :]
    # Which query row each local row is (see the module docstring): a sequence's rows are ordered (token t,
    # KV head of the block, head j of its GQA group). Masked rows point one past the end, so that no store of
    # theirs can land on a real row (the interpreter's scatter drops out-of-bounds updates).
    per_seq = num_queries * heads * group
    seq = first_seq + local // per_seq
    if not spec.identity_order:
      seq = plgpu.load(order_ref.at[seq], mask=row_ok, other=0)
    within = local % per_seq
    token = within // (heads * group)
    row_head = (within // group) % heads  # KV head of the row, within the block
    num_heads = group * k_ref.shape[2]
    flat = (seq * num_queries + token) * num_heads + (hb * heads + row_head) * group + within % group
    flat = jnp.where(row_ok, flat, q_ref.shape[0])
    q = plgpu.load(q_ref.at[flat[:, None], cols[None, :]], mask=tile_ok, other=0)
    # Logits in base 2: exp(x·scale) = 2^(x·c), c = scale·log2 e, so exp2 does the softmax. c multiplies the float32
    # scores inside exp2's argument (one fused multiply-add with the max), not q: q·c rounded back to 16 bits would
    # add an error that grows with the scale. c > 0 and a normal float32 (`api._scale`), so max(s)·c is the largest
    # scaled score. (Exact while the scaled logits stay far below 2^31: beyond, max(s)·c rounded to float32 can miss
    # the fused s·c by more than exp2's range.)
    c = scale * LOG2_E

    length = jnp.clip(kv_len_ref[p], 0, k_ref.shape[1])
    # A key block is block_k columns = block_k // heads keys × `heads` KV heads (column c: key c // heads, head
    # c % heads; contiguous in the [S, Hkv, D] layout).
    step_keys = block.block_k // heads
    # Splits share the group's actual keys (not the capacity), so a short suffix still spreads over all of them.
    split_len = pl.cdiv(pl.cdiv(length, block.splits), step_keys) * step_keys
    lo = sp * split_len
    hi = jnp.minimum(lo + split_len, length)
    k_src, v_src = k_ref, v_ref
    if fresh is not None:  # the new keys of this program's range stored first, then read with the others
      _store_new(fresh, p, node, lo, hi, hb, heads, cols, col_ok, num_queries=num_queries, full=kv_len_ref[p])
      k_src, v_src = fresh.k_out, fresh.v_out  # (on the GPU the same buffers as k_ref, v_ref: aliased)
    # Causal: a row of token t is key (length - T + t) of its sequence; it sees keys up to that one.
    last_visible = length - num_queries + token
    kv_cols = pl.ds(0, d_pad)
    padded = d_pad != head_dim
    col = jnp.arange(block.block_k)
    col_key, col_head = col // heads, hb * heads + col % heads
    same_head = (col % heads)[None, :] == row_head[:, None]  # a row scores only its own KV head's keys

    def load(ref, start, key_ok):
      if heads == 1:
        index = ref.at[node, pl.ds(start, block.block_k), hb, kv_cols]
      else:
        index = ref.at[node, (start + col_key)[:, None], col_head[:, None], cols[None, :]]
      if key_ok is not None:
        return plgpu.load(index, mask=key_ok[:, None] & col_ok[None, :], other=0)
      if padded:
        return plgpu.load(index, mask=jnp.broadcast_to(col_ok[None, :], (block.block_k, d_pad)), other=0)
      return plgpu.load(index)

    def step(i, carry, masked: bool):
      """One key block; `masked` blocks may hold keys past the length or past a row's causal position."""
      acc, m, l = carry
      start = lo + i * step_keys
      pos = start + col_key
      key_ok = pos < hi if masked else None
      s = plgpu.dot(q, load(k_src, start, key_ok), trans_b=True, precision=precision)
      ok = same_head if heads > 1 else None
      if masked:
        ok_keys = key_ok[None, :]
        if spec.causal:
          ok_keys = ok_keys & (pos[None, :] <= last_visible[:, None])
        ok = ok_keys if ok is None else ok & ok_keys
      if ok is not None:
        s = jnp.where(ok, s, -jnp.inf)
      # A row with no visible key in this block keeps its m (max(s)·c = -inf) and adds nothing (probs 0).
      m_new = jnp.maximum(m, jnp.max(s, axis=1) * c)
      alpha = jnp.exp2(m - m_new)
      probs = jnp.exp2(s * c - m_new[:, None])
      v = load(v_src, start, key_ok)
      acc = acc * alpha[:, None] + plgpu.dot(probs.astype(v.dtype), v, precision=precision)
      return acc, m_new, l * alpha + jnp.sum(probs, axis=1)

    carry = (
        jnp.zeros((block.block_m, d_pad), jnp.float32),
        jnp.full((block.block_m,), M_START, jnp.float32),
        jnp.zeros((block.block_m,), jnp.float32),
    )
    # Blocks wholly inside every row's visible keys need no masks; only the last one or two blocks do. (In an
    # unmasked block every row sees a key of its own head, so other heads' masked scores underflow to 0.)
    unmasked_end = jnp.minimum(hi, length - num_queries + 1) if spec.causal else hi
    num_full = jnp.maximum(unmasked_end - lo, 0) // step_keys
    num_steps = pl.cdiv(jnp.maximum(hi - lo, 0), step_keys)
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True), carry)

    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    out = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0)
    lse = jnp.where(seen, (m + jnp.log2(safe_l)) * LN_2, -jnp.inf)
    plgpu.store(o_ref.at[sp, flat[:, None], cols[None, :]], out.astype(o_ref.dtype), mask=tile_ok)
    plgpu.store(lse_ref.at[sp, flat], lse, mask=row_ok)
    if merge is not None:
      _merge_if_last(flat, row_ok, cols, col_ok, merge)


def program_counts(spec: LevelSpec, work: LevelWork) -> tuple[int, ...]:
  """A level's program axes: (groups, KV head blocks, key splits, row blocks), row blocks fastest so that the
  programs running together read the same KV blocks (from L2)."""
  return (work.kv_length.shape[0], work.k.shape[2] // spec.block.heads, spec.block.splits,
          pl.cdiv(spec.max_rows, spec.block.block_m))


def _schedule(pid, sizes: tuple[int, ...], lead: float):
  """For each level l: (whether program `pid` is one of its programs, its index among them).

  lead = 0: in order, level l owns programs [start_l, start_l + sizes[l]). lead > 0: interleaved, each SM gets a
  mix of the levels' programs (compute-bound prefix tiles beside memory-bound suffix ones). With two levels, the
  first level's programs are spread evenly (Bresenham) over a stretch that also holds the first `lead` fraction
  of the second level's programs, the rest of which follow: lead < 1 ends the grid with the short programs
  instead of long prefix ones. With more levels: K = min(sizes) rounds, round r holding the next sizes[l] // K
  programs of each level, the remainders at the end.
  """
  if not lead or len(sizes) == 1:
    starts = [sum(sizes[:l]) for l in range(len(sizes))]
    return [((pid >= a) & (pid < a + n), pid - a) for a, n in zip(starts, sizes)]
  if len(sizes) == 2:
    n_a, n_b = sizes
    span = n_a + int(n_b * lead)  # pid < span: a's program iff the count floor((pid + 1)·n_a / span) steps up
    if span * n_a < 2**31:
      seen_a = jnp.minimum(pid + 1, span) * n_a // span  # a's programs at pids <= pid
      is_a = (pid < span) & (seen_a > pid * n_a // span)
      return [(is_a, seen_a - 1), (~is_a & (pid < n_a + n_b), pid - seen_a)]
  rounds = min(sizes)
  per_round = [n // rounds for n in sizes]
  chunk = sum(per_round)
  main_end = rounds * chunk
  result, cum, tail = [], 0, main_end
  for n, f in zip(sizes, per_round):
    off = pid % chunk
    in_main = (pid < main_end) & (off >= cum) & (off < cum + f)
    rest = n - rounds * f
    in_tail = (pid >= tail) & (pid < tail + rest)
    index = jnp.where(in_main, (pid // chunk) * f + off - cum, rounds * f + pid - tail)
    result.append((in_main | in_tail, index))
    cum += f
    tail += rest
  return result


def _kernel(*refs, specs, counts, lead, merge: bool, interpret: bool, **static):
  """Dispatches program ids to levels (see `_schedule`), then unravels a level's index into its program axes.

  refs: the inputs (5 index vectors and k, v a level; q; with merge the zeroed count; with a fresh level its
  new_count, new k and new v), then the outputs (out and lse a level; with merge the merged out and lse and the
  count, aliased; with a fresh level its k and v caches, aliased)."""
  n = len(specs)
  fresh_level = next((l for l, spec in enumerate(specs) if spec.fresh), None)
  has_fresh = fresh_level is not None
  num_inputs = 7 * n + 1 + merge + 3 * has_fresh
  ins, outs = refs[:num_inputs], refs[num_inputs:]
  ints, kvs, q_ref = ins[:5 * n], ins[5 * n:7 * n], ins[7 * n]
  merged = fresh = None
  if merge:
    merged = _Merge(outs[2 * n + 2], tuple(zip(outs[:2 * n:2], outs[1:2 * n:2])), outs[2 * n], outs[2 * n + 1],
                    interpret)
  if has_fresh:
    fresh = _Fresh(*ins[num_inputs - 3:], *outs[-2:], interpret)
  owned = _schedule(pl.program_id(0), tuple(math.prod(c) for c in counts), lead)
  for l, (spec, shape, (mine, index)) in enumerate(zip(specs, counts, owned)):

    @pl.when(mine)
    def _(l=l, spec=spec, shape=shape, rest=index):
      ids = []
      for extent in reversed(shape):  # unravel, last axis fastest
        ids.append(rest % extent)
        rest = rest // extent
      _attend(tuple(reversed(ids)), ints[5 * l:5 * l + 5], q_ref, kvs[2 * l], kvs[2 * l + 1], outs[2 * l],
              outs[2 * l + 1], spec=spec, merge=merged, fresh=fresh if l == fresh_level else None, **static)


@functools.partial(jax.jit, static_argnames=("specs", "scale", "interpret", "lead", "merge"))
def _launch(q, works, *, specs, scale, interpret, lead, merge):
  """`fused_levels`'s launch: (the parts, the fresh level's written `(k, v)` or None)."""
  b, t, hq, d = q.shape
  hkv = works[0].k.shape[2]
  fresh = [l for l, spec in enumerate(specs) if spec.fresh]
  if len(fresh) > 1 or any(not specs[l].per_sequence for l in fresh):
    raise ValueError(f"levels {fresh} are fresh (LevelSpec.fresh); a launch writes the new keys of at most one "
                     "level, a per-sequence one.")
  counts = tuple(program_counts(spec, work) for spec, work in zip(specs, works))
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  kernel = functools.partial(_kernel, specs=specs, counts=counts, lead=lead, merge=merge, interpret=interpret,
                             head_dim=d, num_queries=t, group=hq // hkv, scale=scale, precision=precision)
  rows = b * t * hq
  out_shape = []
  for spec in specs:
    out_shape += [jax.ShapeDtypeStruct((spec.block.splits, rows, d), q.dtype),
                  jax.ShapeDtypeStruct((spec.block.splits, rows), jnp.float32)]
  ints = [x.astype(jnp.int32) for w in works for x in (w.seq_start, w.row_count, w.kv_index, w.kv_length, w.order)]
  kvs = [x for w in works for x in (w.k, w.v)]
  inputs = [*ints, *kvs, q.reshape(rows, d)]
  aliases = {}
  if merge:  # the merged rows, and the count of parts written per row (zeroed; a spare slot for masked rows)
    out_shape += [jax.ShapeDtypeStruct((rows, d), q.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32),
                  jax.ShapeDtypeStruct((rows + 1,), jnp.float32)]
    inputs.append(jnp.zeros((rows + 1,), jnp.float32))
    aliases[len(inputs) - 1] = len(out_shape) - 1
  if fresh:  # the new keys and values, as rows [B·T, Hkv, D]; the level's caches come back written
    work = works[fresh[0]]
    inputs += [work.new_count.astype(jnp.int32), work.new_k.astype(work.k.dtype).reshape(b * t, hkv, d),
               work.new_v.astype(work.v.dtype).reshape(b * t, hkv, d)]
    out_shape += [jax.ShapeDtypeStruct(work.k.shape, work.k.dtype), jax.ShapeDtypeStruct(work.v.shape, work.v.dtype)]
    aliases[len(ints) + 2 * fresh[0]] = len(out_shape) - 2
    aliases[len(ints) + 2 * fresh[0] + 1] = len(out_shape) - 1

  def whole(x):  # the kernel indexes inside the full array itself
    return pl.BlockSpec(x.shape, lambda *_: (0,) * len(x.shape))

  outs = pl.pallas_call(
      kernel,
      grid=(sum(math.prod(c) for c in counts),),
      in_specs=[whole(x) for x in inputs],
      out_specs=[whole(x) for x in out_shape],
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=max(s.block.num_warps for s in specs),
                                           num_stages=max(s.block.num_stages for s in specs)),
      input_output_aliases=aliases,
      interpret=interpret,
      name="hydragen_fused_levels",
  )(*inputs)
  written = tuple(outs[-2:]) if fresh else None
  if merge:
    n = len(specs)  # after the levels' parts: the merged out and lse
    parts = [(outs[2 * n].reshape(1, b, t, hq, d), outs[2 * n + 1].reshape(1, b, t, hq))]
  else:
    parts = [(outs[2 * i].reshape(spec.block.splits, b, t, hq, d),
              outs[2 * i + 1].reshape(spec.block.splits, b, t, hq)) for i, spec in enumerate(specs)]
  return parts, written


def fused_levels(
    q: Array, works: tuple[LevelWork, ...], *, specs: tuple[LevelSpec, ...], scale: float, interpret: bool,
    lead: float = 0.0, merge: bool = False,
) -> tuple[list[tuple[Array, Array]], tuple[Array, Array] | None]:
  """Attention of q over every level in one kernel launch; one per-sequence level may be fresh (`LevelSpec.fresh`):
  its new keys and values are read from its work's `new_k`, `new_v` and stored into its caches by the launch
  (module docstring).

  Args:
    q: `[B, T, Hq, D]` queries.
    works, specs: one `LevelWork` (arrays) and one `LevelSpec` (static) per level.
    scale: multiplies q·k.
    interpret: run the kernel in the Pallas interpreter (CPU).
    lead: 0 runs the levels' programs level after level; > 0 mixes them over the grid (see `_schedule`).
    merge: merge the parts in the launch: the program that writes a query row's last part (counted per row, in a
      zeroed `[B·T·Hq + 1]` float32 count) merges all of them (`_merge_if_last`), so the step needs no merge launch.
      Every query row must belong to a group of every level (as the API's levels do: each sequence reads one node
      of each); a row of no group is never merged (its output unwritten).

  Returns:
    (parts, written). parts, per level: out `[splits, B, T, Hq, D]` in q's dtype (each split normalised by its own
    softmax sum, so a 16-bit partial loses no range; merging is done in float32) and lse `[splits, B, T, Hq]`
    float32; query rows that belong to no group of a level are left unwritten in its outputs. With merge: one
    stack of one part, the merged out `[1, B, T, Hq, D]` in q's dtype and lse `[1, B, T, Hq]` float32 (out = 0,
    lse = -inf for a row with no keys in any part). written: the fresh level's `(k, v)` caches with the new
    entries (in place where XLA can give the launch their buffers, e.g. a decode loop's carries), or None without
    a fresh level.
  """
  return _launch(q, tuple(works), specs=tuple(specs), scale=scale, interpret=interpret, lead=lead, merge=merge)
