"""Public API: attention, Hydragen's shared-prefix attention, and tree-shaped sharing.

Hydragen (arXiv 2402.05099) splits each sequence's keys into the parts it shares with others and its own suffix,
computes attention over each part, and merges the parts exactly by their log-sum-exp. Shared parts are computed
once for all sequences that read them, their queries stacked into one matrix (inter-sequence batching).

Layout as `jax.nn.dot_product_attention`: q `[B, T, Hq, D]`, KV `[..., S, Hkv, D]`, Hq a multiple of Hkv.
`backend`: "pallas" (compiled GPU kernels: the Hopper kernel where it pays, the Triton kernels elsewhere),
"triton" (the Triton kernels only), "mosaic" (the Hopper kernel wherever it applies, Triton on a GPU that is not
a Hopper), "interpret" /
"interpret-mosaic" (the Triton / Hopper kernels in Pallas' interpreters, for CPU tests), "xla" (the pure-jnp
reference); None picks "pallas" on GPU and "xla" elsewhere. The compiled ones ("pallas", "triton", "mosaic") are
refused where the default device is not a GPU, except inside `hydragen_jax.lowering_for_gpu()` (tracing, to lower
for CUDA from another machine: its docstring says how). The kernel backends define no derivative: `jax.grad`
through them raises (take "xla"); `jax.vmap` runs through them (an axis of size 0 included), `jax.shard_map` with
check_vma=True, Explicit mesh axes and "interpret-mosaic" on several devices are refused by name
(`validation.check_kernel_backend`; docs/API_CONTRACT.md). The Hopper kernel (`kernels/hopper.py`) applies to a
one-prefix-plus-suffixes step with the prefix batched (`hydragen_attention(batch_prefix=True)`, or a two-level
tree whose root is one node read by all sequences and whose leaves are per sequence, `seq_to_node=None`) in
bf16/f16 with D = 64 or 128, T·g whose 8-aligned window is at most 64 rows, cache capacities of 1-8 keys or a
multiple of 8, within the SM's shared memory, and no layer axis (`hopper.supported` names what fails). Other steps run
on the Triton kernels under every kernel backend. "pallas" takes it where the prefix product is large enough to
pay (`dispatch.hopper_pays`: the device's `hopper_min_work`, `hopper_min_seq_work`, `hopper_seq_max_suffix`,
`hopper_min_fill`, `hopper_split_min_rows` and `hopper_max_rows` in `hydragen_jax/tuning`).

Out-of-range values. Concrete lengths and indices outside their range raise `ValueError`. Traced ones (under
`jax.jit`) cannot be checked while tracing; every backend treats them as clamped: a length to [0, capacity], a
node index (`seq_to_node`) and a layer index to [0, N - 1]. No read goes outside the arrays, at no cost (the clamps
sit in index arithmetic the kernels do anyway). For an error instead, pass `checked=True` and wrap the function in
`jax.experimental.checkify.checkify`; `err.throw()` then raises with the argument, the value and its position:

    f = checkify.checkify(jax.jit(functools.partial(hydragen_attention, checked=True)))
    err, out = f(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lengths=lengths.at[1].set(100000))
    err.throw()  # (suffix capacity S = 64) JaxRuntimeError: suffix_lengths must lie in [0, 64] (the KV capacity);
                 # got 100000 at index 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hydragen_jax import dispatch, reference
from hydragen_jax import tuning as tuning_lib
from hydragen_jax import validation as check
from hydragen_jax.kernels import hopper
from hydragen_jax.kernels import merge as merge_kernel
from hydragen_jax.kernels import ops as pallas_ops

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Level:
  """One level of a sharing tree.

  Attributes:
    k, v: `[N, L, Hkv, D]` keys and values of the level's N nodes; with `layer`, `[num_layers, N, L, Hkv, D]`.
    lengths: `[N]` valid tokens of each node (<= L); nodes may differ in length, 0 included.
    seq_to_node: `[B]` the node each sequence reads; None means sequence b reads node b (N == B). A numpy array
      (a tree known when tracing) lets the kernels group the sequences on the host: no device work per step. (A
      Level passed as an argument of a jitted function has its arrays traced, numpy ones too: build it inside the
      function, or close over the numpy map, to keep the grouping; or give `max_group`.)
    max_group: static bound on how many sequences read one node (None: B, or with a numpy seq_to_node its most-read
      node's readers); the kernels give each node rows for that many sequences, so it must hold: checked
      against a concrete seq_to_node (ValueError) and, with `checked=True`, against a traced one (checkify); a
      traced seq_to_node that breaks it unchecked gives undefined output for the sequences past the bound.
    layer: optional (traced) index into the leading layer axis of k/v. The kernels read that layer in place,
      where slicing `k[layer]` under a `lax.scan` over layers would copy it at every step.
  """

  k: Array
  v: Array
  lengths: Array
  seq_to_node: Array | None = None
  max_group: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  layer: Array | None = None


def _scale(scale: float | None, head_dim: int) -> float:
  """The logit scale: 1/sqrt(D) by default, else a positive finite number known at trace time (the kernels fold it
  into their exponents, and take a tile's largest score times the scale as its largest scaled score)."""
  if scale is None:
    return float(head_dim) ** -0.5
  if isinstance(scale, (bool, np.bool_, str, bytes)):  # float() would take True or "1"
    raise ValueError(f"scale must be a positive number known at trace time (a Python float), got {scale!r}.")
  try:
    value = float(scale)
  except (TypeError, ValueError) as e:  # a string, or a traced value (jax's concretization error is a TypeError)
    raise ValueError(f"scale must be a positive number known at trace time (a Python float), got {scale!r}.") from e
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"scale must be a positive finite number, got {value}.")
  scaled = value * math.log2(math.e)  # the kernels' exponents take scores times scale·log2 e, in float32
  if scaled > float(np.finfo(np.float32).max):
    raise ValueError(f"scale={value} is too large: scale·log2 e overflows float32 (at most "
                     f"{float(np.finfo(np.float32).max) / math.log2(math.e):.4g}).")
  if float(np.float32(scaled)) < float(np.finfo(np.float32).tiny):
    raise ValueError(f"scale={value} is too small: scale·log2 e is not a normal float32, which the kernels' exponents "
                     "need.")
  return value


def _reference_level(q, level: Level, *, causal: bool, batched: bool, scale: float) -> tuple[Array, Array]:
  """(out, lse) of q over one level with the pure-jnp reference; traced lengths and indices are clamped."""
  k, v, seq_to_node = level.k, level.v, level.seq_to_node
  if level.layer is not None:
    layer = jnp.clip(level.layer, 0, k.shape[0] - 1)
    k, v = k[layer], v[layer]
  lengths = jnp.clip(level.lengths, 0, k.shape[1])
  if batched and k.shape[0] == 1:
    return reference.shared_attention(q, k[0], v[0], lengths[0], scale=scale)
  if seq_to_node is not None:  # the reference reads each sequence's node through a gather
    nodes = jnp.clip(seq_to_node, 0, k.shape[0] - 1)
    k, v, lengths = k[nodes], v[nodes], lengths[nodes]
  return reference.attention(q, k, v, lengths, causal=causal, scale=scale)


def _kernel_plan(q, level: Level, *, causal: bool, batched: bool, shared_launch: bool, fill: bool = True,
                 new=None):
  """The level as work for the Pallas kernel; KV rows are addressed in place (layer offset, node index); fill:
  whether its tiling may take the tuning's `split_min_fill` (`pallas_ops.launch_fill`); new: the step's new keys
  `(new_k, new_v, new_tokens)` for the launch to read and write (a per-sequence level of the sequences' own rows).

  Traced indices are clamped here, in the index arithmetic that runs anyway (layer offset, node gather, grouping);
  the kernels clamp lengths and KV rows themselves."""
  k, v, lengths = level.k, level.v, level.lengths
  num_nodes = k.shape[-4]
  offset = 0
  if level.layer is not None:  # view [layers, N, ...] as rows [layers·N, ...]: free, no copy
    offset = jnp.clip(level.layer, 0, k.shape[0] - 1) * num_nodes
    k, v = (x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]) for x in (k, v))  # (-1 fails on 0 keys)
  # Static index vectors are numpy constants: no device work per step (an iota or a gather would be a kernel).
  identity = level.seq_to_node is None
  if identity:
    nodes = np.arange(q.shape[0], dtype=np.int32)
  else:  # a numpy seq_to_node (a static tree) stays numpy: its grouping is computed on the host
    nodes = (np if isinstance(level.seq_to_node, np.ndarray) else jnp).clip(level.seq_to_node, 0, num_nodes - 1)
  if batched:
    return pallas_ops.batched(q, k, v, lengths, nodes, node_offset=offset, max_group=level.max_group,
                              causal=causal, shared_launch=shared_launch, fill=fill)
  if identity:
    return pallas_ops.per_sequence(q, k, v, lengths, kv_offset=offset, causal=causal, shared_launch=shared_launch,
                                   fill=fill, new=new)
  if not isinstance(nodes, np.ndarray):  # a traced gather: numpy lengths (known now) must become a jnp array first
    lengths = jnp.asarray(lengths)
  return pallas_ops.per_sequence(q, k, v, lengths[nodes], offset + nodes, causal=causal,
                                 shared_launch=shared_launch, fill=fill)


def _hopper_runs(q, levels: Sequence[Level], *, causal: Sequence[bool], batched: Sequence[bool], backend: str) -> bool:
  """Whether the Hopper kernel runs a step: not where the levels are not its case (one prefix node shared by the
  whole batch and batched, then each sequence's own causal suffix, no layer axis, shapes `hopper.supported`
  takes), nor with backend "pallas" where the Triton kernels are as fast (`dispatch.hopper_pays`), nor with
  "mosaic" on a GPU that is not a Hopper (its wgmma and TMA need one: Triton runs instead, as documented)."""
  if backend not in ("mosaic", "interpret-mosaic", "pallas") or (backend == "mosaic" and dispatch.gpu_without_hopper()):
    return False
  if len(levels) != 2 or not batched[0] or batched[1] or causal[0] or not causal[1]:
    return False
  prefix, suffix = levels
  if prefix.k.shape[0] != 1 or suffix.seq_to_node is not None or prefix.layer is not None or suffix.layer is not None:
    return False
  prefix_k = prefix.k[0]  # [P, Hkv, D]
  if hopper.supported(q, prefix_k, suffix.k) is not None:
    return False
  return backend != "pallas" or dispatch.hopper_pays(q, prefix_k.shape[1], prefix_k.shape[0],
                                                  suffix_capacity=suffix.k.shape[1])


def _hopper_parts(q, levels: Sequence[Level], *, causal: Sequence[bool], batched: Sequence[bool], scale: float,
                  backend: str):
  """The parts of a Hydragen step by the Hopper kernel (the prefix's, one a key split, and the suffixes'), or None
  where it does not run (`_hopper_runs`)."""
  if not _hopper_runs(q, levels, causal=causal, batched=batched, backend=backend):
    return None
  prefix, suffix = levels
  prefix_k = prefix.k[0]  # [P, Hkv, D]
  return list(hopper.prefix_suffix_attention(q, prefix_k, prefix.v[0], prefix.lengths[0], suffix.k, suffix.v,
                                             suffix.lengths, scale=scale, interpret=backend == "interpret-mosaic"))


def _attend(q, levels: Sequence[Level], *, causal: Sequence[bool], batched: Sequence[bool], scale: float,
            backend: str):
  """The `(out [P, B, T, Hq, D], lse [P, B, T, Hq])` stacks of q's parts over every level (P parts a stack: a
  level's key splits on the Triton kernels; the reference's parts a stack of one each), to be merged by `_merge`.
  The Hopper kernel's parts come merged already, a stack of one: by `merge_states`, into whose fusions XLA folds
  the kernel's layout change of each part (`[Hkv, B·T·g, D]` -> `[B, T, Hq, D]`), which the merge kernel would
  take only materialised, a copy a part (the figures: docs/KERNELS.md, "Its parts")."""
  rows = q.shape[0] * q.shape[1] * q.shape[2]
  if rows == 0:  # no queries (B, T or Hq = 0): nothing to attend (kernels need a row)
    return _no_keys(q)
  if backend == "xla":
    return [_one(_reference_level(q, level, causal=c, batched=b, scale=scale))
            for level, c, b in zip(levels, causal, batched)]
  with jax.enable_x64(False):  # the kernels are 32-bit: their Python ints must trace as int32 under jax_enable_x64
    return _kernel_stacks(q, levels, causal=causal, batched=batched, scale=scale, backend=backend)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _no_derivative(x, backend: str):
  """x unchanged; differentiating through it (`jax.grad`, `jax.jvp`) raises: the kernels define no derivative.
  Costs nothing without differentiation (an identity inlined when lowering)."""
  return x


@_no_derivative.defjvp
def _no_derivative_jvp(backend, primals, tangents):
  raise ValueError(f"backend={backend!r} runs kernels that define no derivative (they are for inference): "
                   "differentiate with backend='xla', the jnp reference.")


def _kernel_stacks(q, levels: Sequence[Level], *, causal: Sequence[bool], batched: Sequence[bool], scale: float,
                   backend: str, new=None):
  """`_attend` on the kernel backends. new: `(new_k, new_v, new_tokens)` of the last level, which the Triton
  launch reads and writes (`tree_attention_append`); then returns (the stacks, the written `(k, v)`)."""
  q, levels, new = jax.tree.map(  # a clear error for jax.grad, where Pallas would fail inside its own rules
      lambda x: _no_derivative(x, backend) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x,
      (q, levels, new))
  rows = q.shape[0] * q.shape[1] * q.shape[2]
  parts = _hopper_parts(q, levels, causal=causal, batched=batched, scale=scale, backend=backend)
  if parts is not None:
    return [_one(reference.merge_states(parts))]
  news = [None] * (len(levels) - 1) + [new]
  plans = [_kernel_plan(q, level, causal=c, batched=b, shared_launch=len(levels) > 1, new=n)
           for level, c, b, n in zip(levels, causal, batched, news)]
  if len(levels) > 1 and tuning_lib.current().split_min_fill < 1:  # the split rule is the launch's
    present = [i for i, plan in enumerate(plans) if plan is not None]
    fills = pallas_ops.launch_fill([pallas_ops.plan_level(plans[i], q.shape) for i in present])
    for i, keep in zip(present, fills):
      if not keep:  # tiled again without it
        plans[i] = _kernel_plan(q, levels[i], causal=causal[i], batched=batched[i], shared_launch=True, fill=False,
                                new=news[i])
  stacks, written = pallas_ops.run_write(
      q, plans, scale=scale, interpret=backend.startswith("interpret"), stacked=True,
      merge=merge_kernel.method(rows, q.shape[-1], tuning_lib.current()) == "launch")
  stacks = stacks or _no_keys(q)
  return stacks if new is None else (stacks, written)


def _no_keys(q):
  """The stacks of a step that attends to no key: one part, out 0 and lse -inf (in the op's accumulation dtype,
  float32 on the kernel backends, which take 16- and 32-bit inputs only)."""
  return [(jnp.zeros_like(q)[None], jnp.full((1, *q.shape[:-1]), -jnp.inf, reference.accumulation_dtype(q)))]


def _one(part):
  """A part `(out, lse)` as a stack of one (a free reshape)."""
  return part[0][None], part[1][None]


def _merge(stacks, backend: str):
  """The stacks' parts merged by log-sum-exp: the one part as it is; on the kernel backends, up to the tuning's
  (`tuning.current()`) `merge_max_rows` query rows, in one Pallas launch (`kernels.merge`, where its shapes apply);
  else `merge_states`."""
  if sum(out.shape[0] for out, _ in stacks) == 1:
    return stacks[0][0][0], stacks[0][1][0]
  shape = stacks[0][0].shape[1:]
  if backend != "xla" and merge_kernel.applies(math.prod(shape[:-1]), shape[-1], tuning_lib.current().merge_max_rows):
    with jax.enable_x64(False):  # as `_attend`
      return merge_kernel.merge_stacks(stacks, interpret=backend.startswith("interpret"))
  return reference.merge_states([(o[i], l[i]) for o, l in stacks for i in range(o.shape[0])])


def _step(q, levels: Sequence[Level], *, causal: Sequence[bool], batched: Sequence[bool], scale: float,
          backend: str) -> tuple[Array, Array]:
  """(out in q's dtype, lse) of q over the validated levels."""
  def step(q, levels):
    out, lse = _merge(_attend(q, levels, causal=causal, batched=batched, scale=scale, backend=backend), backend)
    return out.astype(check.dtype_of(q)), lse

  return _kernel_call(step, backend, q, levels)


def _kernel_call(fn, backend: str, *args):
  """fn(*args), a step from its validated arguments. On the kernel backends the traced leaves of args go through
  `_vmap_empty_ok`: `jax.vmap` over an axis of size 0 gives empty outputs, where Pallas' batching rule fails (it
  slices a block of one row from the empty axis). The other leaves (concrete arrays, numpy constants that the
  kernels' plans read on the host) stay as they are, closed over."""
  leaves, tree = jax.tree.flatten(args)
  traced = [isinstance(x, jax.core.Tracer) for x in leaves]
  if backend == "xla" or not any(traced):  # jnp vmaps over empty axes; untraced arguments: no vmap
    return fn(*args)

  def call(*dynamic):
    dynamic = iter(dynamic)
    return fn(*jax.tree.unflatten(tree, [next(dynamic) if t else x for x, t in zip(leaves, traced)]))

  return _vmap_empty_ok(call)(*(x for x, t in zip(leaves, traced) if t))


def _vmap_empty_ok(fn):
  """fn (of arrays) whose `jax.vmap` over an axis of size 0 gives its outputs zeros of that size along it (as on
  "xla", which vmaps there), and over any other axis is fn's own vmap; an outer vmap's axis is handled alike."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, *args):
    if axis_size == 0:
      one = [jax.ShapeDtypeStruct(x.shape[1:] if b else x.shape, x.dtype) for x, b in zip(args, in_batched)]
      out = jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), jax.eval_shape(fn, *one))
    else:
      out = _vmap_empty_ok(jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched)))(*args)
    return out, jax.tree.map(lambda _: True, out)

  return wrapped


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    kv_lengths: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    checked: bool = False,
) -> tuple[Array, Array]:
  """Attention of each sequence's queries over its own keys, with the log-sum-exp for merging.

  Args:
    q: `[B, T, Hq, D]`.
    k, v: `[B, S, Hkv, D]`.
    kv_lengths: `[B]` valid keys per sequence (default S).
    causal: the T queries are the last T valid keys: query t sees positions <= kv_lengths - T + t.
    scale: logit scale, default 1/sqrt(D).
    backend: one of BACKENDS (module docstring) or None.
    checked: check traced kv_lengths with checkify (module docstring: "Out-of-range values").

  Returns:
    out `[B, T, Hq, D]` (q.dtype; 0 for a query that sees no key) and lse `[B, T, Hq]` float32 (-inf there;
    float64 for float64 inputs, which run on "xla": `reference.accumulation_dtype`).
  """
  check.check_rank("q", q, 4, "[B, T, Hq, D]")
  check.check_rank("k", k, 4, "[B, S, Hkv, D]")
  check.check_same("k", k, "v", v)
  check.check_heads("q", q, "k", k)
  check.check_flag("causal", causal)
  check.check_flag("checked", checked)
  if k.shape[0] != q.shape[0]:
    raise ValueError(f"batch of k {k.shape} differs from batch of q {q.shape}.")
  lengths = check.lengths_or_full("kv_lengths", kv_lengths, q.shape[0], k.shape[1], checked)
  backend = dispatch.resolve_backend(backend)
  check.check_kernel_backend(backend, q=q, k=k, v=v, kv_lengths=lengths)
  return _step(q, [Level(k, v, lengths)], causal=[causal], batched=[False], scale=_scale(scale, q.shape[-1]),
               backend=backend)


def merge_states(states: Sequence[tuple[Array, Array]]) -> tuple[Array, Array]:
  """Exact log-sum-exp merge of `(out [..., D], lse [...])` parts over disjoint keys; empty parts (lse = -inf)
  contribute nothing and never produce NaN. Returns (out, lse)."""
  if isinstance(states, Iterator):  # a generator: taken once, here (the jitted merge takes pytrees)
    states = list(states)
  return reference.merge_states(states)


def tree_attention(
    q: Array,
    levels: Sequence[Level],
    *,
    scale: float | None = None,
    backend: str | None = None,
    batch_shared: bool | Sequence[bool] = True,
    checked: bool = False,
) -> Array:
  """Attention over keys shared along a tree: each sequence reads one node per level, root to leaf.

  Args:
    q: `[B, T, Hq, D]`.
    levels: root to leaf. All levels but the last are fully visible; the last is causal, its T queries being its
      last T valid tokens (a query t with no visible leaf key still sees the shared levels).
    scale: logit scale, default 1/sqrt(D).
    backend: one of BACKENDS (module docstring) or None.
    batch_shared: stack the queries of all sequences that read a shared node into one matrix (Hydragen). False
      reads each shared node once per sequence (the shared-storage baseline); results are identical. A sequence
      of one bool per shared level (all levels but the last) chooses per level (`dispatch.batching_pays` is the
      models' choice).
    checked: check traced lengths, seq_to_node and layer with checkify (module docstring: "Out-of-range values").

  Returns:
    out `[B, T, Hq, D]` in q.dtype: softmax attention over the concatenation of each sequence's nodes (0 for a
    query that sees no key).
  """
  check.check_rank("q", q, 4, "[B, T, Hq, D]")
  check.check_flag("checked", checked)
  validated, causal, batched = _tree_levels(q, levels, batch_shared, checked)
  backend = dispatch.resolve_backend(backend)
  check.check_kernel_backend(backend, q=q, levels=validated)
  return _step(q, validated, causal=causal, batched=batched, scale=_scale(scale, q.shape[-1]), backend=backend)[0]


def _tree_levels(q, levels, batch_shared, checked: bool) -> tuple[list[Level], list[bool], list[bool]]:
  """`tree_attention`'s levels checked (ValueError naming the argument), with their lengths and indices as the
  kernels take them; and per level whether it is causal (the last) and read batched."""
  if isinstance(levels, Level):
    raise ValueError("levels must be a sequence of Level, root to leaf (the last one the per-sequence suffixes); "
                     "got one Level: pass [level].")
  if not hasattr(levels, "__iter__") or hasattr(levels, "shape"):
    raise ValueError(f"levels must be a sequence of Level, root to leaf; got {type(levels).__name__}.")
  levels = list(levels)  # a generator or other iterable, taken once
  if not levels:
    raise ValueError("levels is empty; expected at least one Level.")
  batch = q.shape[0]
  validated = []
  for i, level in enumerate(levels):
    name = f"levels[{i}]"
    if not isinstance(level, Level):
      raise ValueError(f"{name} must be a Level(k, v, lengths, seq_to_node, ...); got {type(level).__name__}.")
    layered = level.layer is not None
    layout = "[num_layers, N, L, Hkv, D]" if layered else "[N, L, Hkv, D]"
    check.check_rank(f"{name}.k", level.k, 5 if layered else 4, layout)
    check.check_same(f"{name}.k", level.k, f"{name}.v", level.v)
    check.check_heads("q", q, f"{name}.k", level.k)
    num_nodes, capacity = level.k.shape[-4:-2]
    if level.k.shape[-2] != levels[0].k.shape[-2]:
      raise ValueError(f"{name}.k {level.k.shape} has Hkv={level.k.shape[-2]} KV heads but levels[0].k "
                       f"{levels[0].k.shape} has {levels[0].k.shape[-2]}; all levels need the same.")
    lengths = check.lengths_or_full(f"{name}.lengths", level.lengths, num_nodes, capacity, checked)
    if level.seq_to_node is None:
      if num_nodes != batch:
        raise ValueError(f"{name}.seq_to_node is None, which needs one node per sequence, but {name}.k has "
                         f"{num_nodes} nodes {level.k.shape} for {batch} sequences (q {q.shape}).")
      nodes = None
    else:
      nodes = check.node_index(f"{name}.seq_to_node", level.seq_to_node, batch, num_nodes, checked, q.size > 0)
    bound = check.max_group(f"{name}.max_group", level.max_group, nodes, num_nodes, checked)
    layer = (check.layer_index(f"{name}.layer", level.layer, level.k.shape[0], checked, q.size > 0) if layered
             else None)
    validated.append(dataclasses.replace(level, lengths=lengths, seq_to_node=nodes, layer=layer, max_group=bound))
  last = [i == len(levels) - 1 for i in range(len(levels))]  # the leaf level is causal, shared ones are not
  traced = isinstance(batch_shared, jax.core.Tracer) or (
      isinstance(batch_shared, (list, tuple)) and any(isinstance(b, jax.core.Tracer) for b in batch_shared))
  if traced:  # a flag given to a jitted call as an ordinary argument
    raise ValueError(f"batch_shared={batch_shared!r}: expected a bool, or one bool per shared level, known at trace "
                     f"time. {check.static_hint('batch_shared')}")
  if isinstance(batch_shared, (bool, np.bool_)):
    batched = [bool(batch_shared) and not leaf for leaf in last]
  else:
    ok_type = isinstance(batch_shared, (list, tuple)) or (isinstance(batch_shared, np.ndarray)
                                                          and batch_shared.ndim == 1)
    batched = list(batch_shared) if ok_type else None
    if (batched is None or len(batched) != len(levels) - 1
        or not all(isinstance(b, (bool, np.bool_)) for b in batched)):
      raise ValueError(f"batch_shared={batch_shared!r}: expected a bool, or one bool per shared level "
                       f"({len(levels) - 1} for {len(levels)} levels)")
    batched = [bool(b) for b in batched] + [False]
  return validated, last, batched


def _append_in_launch(q, levels: Sequence[Level], causal, batched, backend: str) -> bool:
  """Whether `tree_attention_append`'s launch writes the new keys itself: on the Triton kernels (a kernel backend
  where the Hopper kernel does not take the step), with queries, a leaf of the sequences' own caches (no
  seq_to_node, no layer axis) and a capacity."""
  leaf = levels[-1]
  return (backend != "xla" and math.prod(q.shape[:3]) > 0 and leaf.seq_to_node is None and leaf.layer is None
          and leaf.k.shape[1] > 0 and not _hopper_runs(q, levels, causal=causal, batched=batched, backend=backend))


def append_in_launch(q: Array, levels: Sequence[Level], *, backend: str | None = None,
                     batch_shared: bool | Sequence[bool] = True) -> bool:
  """Whether `tree_attention_append` with these arguments writes the new keys inside the attention's launch (the
  Triton kernels), rather than by a scatter before it (the `xla` backend, the Hopper kernel's steps, steps without
  queries or with a leaf of capacity 0). False also for a leaf with seq_to_node or a layer axis, which
  `tree_attention_append` refuses. A caller with a faster write of its own (one scatter of both caches, say) can
  keep it where this is False. Arguments as `tree_attention`'s."""
  check.check_rank("q", q, 4, "[B, T, Hq, D]")
  validated, causal, batched = _tree_levels(q, levels, batch_shared, False)
  return _append_in_launch(q, validated, causal, batched, dispatch.resolve_backend(backend))


def tree_attention_append(
    q: Array,
    levels: Sequence[Level],
    new_k: Array,
    new_v: Array,
    *,
    new_tokens: Array | None = None,
    scale: float | None = None,
    backend: str | None = None,
    batch_shared: bool | Sequence[bool] = True,
    checked: bool = False,
) -> tuple[Array, Array, Array]:
  """A decode step's cache write and attention in one: the step's new keys and values are appended to each
  sequence's cache (the last level), then `tree_attention` attends over every level, the new keys included.

  Equal to `reference.append(leaf.k, leaf.v, new_k, new_v, lengths, new_tokens)` followed by `tree_attention` with
  the leaf's lengths min(lengths + new_tokens, S) (lengths and new_tokens clamped to [0, S] and [0, T] where traced).
  On the Triton kernels (`append_in_launch`) the attention's launch does the write: each program that reads new keys
  first stores them into the caches from new_k and new_v, so the step has no write launch; elsewhere a scatter
  writes them first.

  Args:
    q: `[B, T, Hq, D]`, the T query slots of each sequence (right-aligned: sequence b's new_tokens[b] real tokens
      are its last slots).
    levels: as `tree_attention`'s; the last is the sequences' own caches: `k, v [B, S, Hkv, D]`, seq_to_node None,
      no layer axis, lengths `[B]` the entries held before this step.
    new_k, new_v: `[B, T, Hkv, D]` floating-point, the step's keys and values (cast to the caches' dtype).
    new_tokens: `[B]` real slots of each sequence, in [0, T] (default T). Entries that would land at or past S are
      dropped (and the attention reads S keys); traced out-of-range lengths and new_tokens are clamped (module
      docstring).
    scale, backend, batch_shared, checked: as `tree_attention`'s (checked also covers new_tokens).

  Returns:
    out `[B, T, Hq, D]` in q.dtype, and the leaf's written k and v caches. Under jit, in place where XLA can give
    the write the caches' buffers (a decode loop's carries, donated arguments); else XLA copies them first.
  """
  check.check_rank("q", q, 4, "[B, T, Hq, D]")
  check.check_flag("checked", checked)
  validated, causal, batched = _tree_levels(q, levels, batch_shared, checked)
  leaf = validated[-1]
  name = f"levels[{len(validated) - 1}]"
  if given := [field for field in ("seq_to_node", "layer") if getattr(leaf, field) is not None]:
    raise ValueError(f"tree_attention_append writes the last level, which must be the sequences' own caches "
                     f"[B, S, Hkv, D]; {name} has {' and '.join(given)} set: expected None.")
  b, t = q.shape[:2]
  hkv, d = leaf.k.shape[2:]
  check.check_rank("new_k", new_k, 4, "[B, T, Hkv, D]")
  check.check_same("new_k", new_k, "new_v", new_v)
  if new_k.shape != (b, t, hkv, d):
    raise ValueError(f"new_k {new_k.shape}: expected [B, T, Hkv, D] = {(b, t, hkv, d)} (q's B and T, {name}.k's "
                     "Hkv and D).")
  if not jnp.issubdtype(new_k.dtype, jnp.floating):
    raise ValueError(f"new_k and new_v must be floating-point keys and values; got {new_k.dtype}.")
  counts = check.lengths_or_full("new_tokens", new_tokens, b, t, checked, what="(T, the query slots)")
  counts = jnp.clip(counts, 0, t)  # traced values out of range (module docstring)
  backend = dispatch.resolve_backend(backend)
  check.check_kernel_backend(backend, q=q, levels=validated, new_k=new_k, new_v=new_v, new_tokens=counts)
  scale = _scale(scale, q.shape[-1])

  def step(q, levels, new_k, new_v, counts):
    leaf = levels[-1]
    old = jnp.clip(leaf.lengths, 0, leaf.k.shape[1])  # traced lengths clamped (module docstring)
    total = old + counts  # at most S + T: the entries past S are dropped, the attention clamps to S
    if _append_in_launch(q, levels, causal, batched, backend):
      with jax.enable_x64(False):  # as `_attend`
        stacks, (k_cache, v_cache) = _kernel_stacks(q, levels[:-1] + [dataclasses.replace(leaf, lengths=total)],
                                                    causal=causal, batched=batched, scale=scale, backend=backend,
                                                    new=(new_k, new_v, counts))
    else:
      k_cache, v_cache = reference.append(leaf.k, leaf.v, new_k, new_v, old, counts)
      leaf = dataclasses.replace(leaf, k=k_cache, v=v_cache, lengths=total)
      stacks = _attend(q, levels[:-1] + [leaf], causal=causal, batched=batched, scale=scale, backend=backend)
    out, _ = _merge(stacks, backend)
    return out.astype(check.dtype_of(q)), k_cache, v_cache

  return _kernel_call(step, backend, q, validated, new_k, new_v, counts)


def hydragen_attention(
    q: Array,
    prefix_k: Array,
    prefix_v: Array,
    suffix_k: Array,
    suffix_v: Array,
    *,
    prefix_length: Array | int | None = None,
    suffix_lengths: Array | None = None,
    scale: float | None = None,
    backend: str | None = None,
    batch_prefix: bool = True,
    checked: bool = False,
) -> Array:
  """Hydragen: one prefix shared by the whole batch plus each sequence's suffix.

  Args:
    q: `[B, T, Hq, D]`, the last T valid tokens of each suffix.
    prefix_k, prefix_v: `[P, Hkv, D]`, shared by all B sequences, fully visible.
    suffix_k, suffix_v: `[B, S, Hkv, D]`, causal for the T queries.
    prefix_length: valid prefix tokens (default P; 0 allowed).
    suffix_lengths: `[B]` valid suffix tokens (default S), normally >= T; where a suffix holds fewer than T, a
      query with no visible suffix key still sees the whole prefix (as in `tree_attention`).
    scale, backend: as `attention`.
    batch_prefix: one matrix product over the prefix for all B·T·g queries (True), or one read per sequence.
    checked: check traced prefix_length and suffix_lengths with checkify (module docstring: "Out-of-range values").

  Returns:
    out `[B, T, Hq, D]`, equal to causal attention over each sequence's [prefix; suffix] (0 for a query that sees
    no key).
  """
  check.check_rank("q", q, 4, "[B, T, Hq, D]")
  check.check_flag("batch_prefix", batch_prefix)
  check.check_flag("checked", checked)
  check.check_rank("prefix_k", prefix_k, 3, "[P, Hkv, D]")
  check.check_same("prefix_k", prefix_k, "prefix_v", prefix_v)
  check.check_rank("suffix_k", suffix_k, 4, "[B, S, Hkv, D]")
  check.check_same("suffix_k", suffix_k, "suffix_v", suffix_v)
  check.check_heads("q", q, "prefix_k", prefix_k)
  check.check_heads("q", q, "suffix_k", suffix_k)
  if prefix_k.shape[1:] != suffix_k.shape[2:]:
    raise ValueError(f"prefix_k {prefix_k.shape} and suffix_k {suffix_k.shape} must share [Hkv, D].")
  if suffix_k.shape[0] != q.shape[0]:
    raise ValueError(f"batch of suffix_k {suffix_k.shape} differs from batch of q {q.shape}.")
  prefix = Level(prefix_k[None], prefix_v[None],
                 check.scalar_length("prefix_length", prefix_length, prefix_k.shape[0], checked),
                 np.zeros((suffix_k.shape[0],), np.int32))
  suffix = Level(suffix_k, suffix_v,
                 check.lengths_or_full("suffix_lengths", suffix_lengths, suffix_k.shape[0], suffix_k.shape[1],
                                       checked))
  return tree_attention(q, [prefix, suffix], scale=scale, backend=backend, batch_shared=batch_prefix,
                        checked=checked)
