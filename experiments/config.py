"""Experiment configs: TOML files with a `[smoke]` table of overrides, validated against a schema.

A config names its `kind` (which experiment runs it); every kind has a schema (nested dict of expected keys).
Leaves of a schema are `Field`s (a list of values: `ListOf`); a list of tables is described by `Rows(schema)`.
Unknown or ill-typed keys raise `ConfigError` whose message names the dotted key (e.g. `bench.configs[2].batch`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import tomllib
from typing import Any, Callable

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config is malformed; the message names the offending key."""


@dataclasses.dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    required: bool = True
    check: Callable[[Any], bool] | None = None
    hint: str = ""


@dataclasses.dataclass(frozen=True)
class Rows:
    """A non-empty array of tables, each validated against `schema`."""

    schema: dict


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A non-empty array of scalars of one of `types`, each passing `check`."""

    types: tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    hint: str = ""
    required: bool = True


def positive_int(hint: str = "an integer >= 1", required: bool = True) -> Field:
    return Field((int,), check=lambda v: not isinstance(v, bool) and v >= 1, hint=hint, required=required)


def non_negative_int() -> Field:
    return Field((int,), check=lambda v: not isinstance(v, bool) and v >= 0, hint="an integer >= 0")


def seconds() -> Field:
    """An optional duration: a finite number of seconds >= 0 (a bool is refused by `_check_value`, as anywhere
    bool is not among a field's types)."""
    return Field((int, float), required=False, check=lambda v: 0 <= v < math.inf, hint="seconds >= 0")


def simpson_length() -> Field:
    """A decode length timed at Simpson's three suffix lengths 1, (n + 1) // 2 and n (`floor.simpson_points`): at
    least 3, where the three are distinct (n = 2 timed s = 1 twice and weighed it 5/6)."""
    return Field((int,), check=lambda v: v >= 3, hint="an integer >= 3 (Simpson's suffix lengths 1, (n + 1) // 2 "
                 "and n, distinct)")


def random_seed() -> Field:
    """A random seed: an integer in [0, 2**31) (the runs add small offsets to it, and JAX keys take it as a 32-bit
    or 64-bit integer: a larger one passed validation, then failed every point with an OverflowError)."""
    return Field((int,), check=lambda v: 0 <= v < 2**31, hint="an integer in [0, 2**31)")


def one_of(*choices: str, required: bool = True) -> Field:
    return Field((str,), required=required, check=lambda v: v in choices, hint=f"one of {list(choices)}")


TIMING_SCHEMA = {
    "warmup": non_negative_int(),
    "repeats": positive_int("an integer >= 1 (use >= 5 for reported numbers)"),
    "min_repeat_s": seconds(),
    "max_inner": Field((int,), required=False, check=lambda v: v >= 1, hint="an integer >= 1"),
    "time_budget_s": Field((int, float), required=False, check=lambda v: v > 0, hint="seconds > 0"),
    # bench-attention: decode steps chained in one compiled call (timing.chain_steps); the step time is the call's / this.
    "steps_per_call": positive_int(required=False),
}

DEVICE_SCHEMA = {
    # Overrides the capacity reported by the device (bytes); used for the memory estimate checked before allocating.
    "memory_capacity_bytes": Field((int,), required=False, check=lambda v: v > 0, hint="bytes > 0"),
    # Fraction of the capacity that an estimate may use before the point is recorded as out of memory.
    "memory_fraction": Field((float, int), required=False, check=lambda v: 0 < v <= 1, hint="in (0, 1]"),
    # bench-attention: the device's L2 cache (bytes; 0 or absent: not counted). A timed chain of steps reads copies
    # of the KV in turn, at least twice this together (bench_attention.l2_copies), so that a step's data is not
    # served from L2 from step to step.
    "l2_bytes": Field((int,), required=False, check=lambda v: not isinstance(v, bool) and v >= 0,
                      hint="bytes >= 0"),
}

BANDWIDTH_PROBES = ("copy", "read", "pallas_read")  # the probes of experiments.device_rates

# The device rates measured at the start of every run (experiments.device_rates): the floor's bandwidth is the best
# of the probes, each over `copy_bytes` of data; the matmul rate is an n x n x n matmul in the run's dtype.
RATES_SCHEMA = {
    "copy_bytes": positive_int(),
    "matmul_n": positive_int(),
    "probes": ListOf((str,), check=lambda v: v in BANDWIDTH_PROBES, hint=f"one of {list(BANDWIDTH_PROBES)}",
                     required=False),
    # Runs on several devices (mesh.model > 1): the all-reduce probe's message sizes in bytes per device; the floor's
    # inter-device bandwidth is the best bus bandwidth among them (experiments.device_rates.allreduce_rates).
    "allreduce_bytes": ListOf((int,), check=lambda v: not isinstance(v, bool) and v >= 1, hint="bytes >= 1",
                              required=False),
    # Seconds each repeat of a probe lasts at least (calls back to back; default device_rates.PROBE_MIN_REPEAT_S,
    # 0.05): the smoke runs take 0 (one call a repeat), their rates being only plumbing.
    "min_repeat_s": seconds(),
}

COMMON_SCHEMA = {
    "name": Field((str,)),
    "kind": one_of("bench_attention", "e2e_throughput", "long_document", "tree_apps"),
    "description": Field((str,), required=False),
    "timing": TIMING_SCHEMA,
    "rates": RATES_SCHEMA,
    "device": {**DEVICE_SCHEMA, "__optional__": True},
}

# The last two are outside anchors (experiments.anchors): PyTorch and FlashInfer, skipped with a reason where absent.
BENCH_VARIANTS = ("hydragen", "hydragen_triton", "reference", "cudnn_per_sequence", "xla_per_sequence", "shared_storage",
                  "torch_hydragen", "flashinfer_cascade")

BENCH_SCHEMA = {
    **COMMON_SCHEMA,
    "bench": {
        "dtype": one_of("bfloat16", "float16", "float32"),
        "head_dim": positive_int(),
        "variants": ListOf((str,), check=lambda v: v in BENCH_VARIANTS, hint=f"one of {list(BENCH_VARIANTS)}"),
        # Backend of the `hydragen` and `shared_storage` variants: "auto" = pallas on GPU, `cpu_backend` elsewhere.
        "hydragen_backend": one_of("auto", "pallas", "triton", "mosaic", "interpret", "interpret-mosaic", "xla"),
        "cpu_backend": one_of("interpret", "xla"),
        "seed": random_seed(),
        "configs": Rows({
            "batch": positive_int(),
            "prefix": positive_int(),
            "out": simpson_length(),
            "q_heads": positive_int(),
            "kv_heads": positive_int(),
        }),
    },
}

MODES = ("hydragen", "standard", "shared_storage", "none")

def _model_shape_schema() -> dict:
    """Fields of models.config.LlamaConfig that a config may set (the shape of the random model)."""
    ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings")
    schema = {k: positive_int() for k in ints}
    schema["max_position_embeddings"] = Field((int,), required=False, check=lambda v: v >= 1, hint="an integer >= 1")
    schema["rope_theta"] = Field((int, float), required=False, check=lambda v: v > 0, hint="> 0")
    schema["rms_norm_eps"] = Field((float,), required=False, check=lambda v: v > 0, hint="> 0")
    schema["tie_word_embeddings"] = Field((bool,), required=False)
    return schema


MODEL_SCHEMA = {
    "dtype": one_of("bfloat16", "float32"),  # the models' (models.llama.model_dtype)
    "seed": random_seed(),
    "shape": _model_shape_schema(),
}

DECODE_SCHEMA = {
    "steps_per_sample": positive_int("decode steps timed at each of the 3 positions, >= 1"),
    "point_budget_s": Field((int, float), check=lambda v: v > 0, hint="seconds > 0"),
    "full_decode": Field((bool,)),
    "prefill_chunk": positive_int(),
}

def _tensor_parallel(value) -> bool:
    sizes = value if isinstance(value, list) else [value]
    return (bool(sizes) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)
            and len(set(sizes)) == len(sizes))  # [2, 2] would run the grid twice under one name


# Tensor parallelism (models.parallel): the model's devices along the mesh axis "model"; a list runs the whole grid
# once per size, in the same run (e.g. [1, 2]: one GPU, then two). Absent: one device, and no `tp` in the points.
MESH_SCHEMA = {
    "model": Field((int, list), check=_tensor_parallel, hint="a device count >= 1, or a non-empty list of distinct ones"),
    "__optional__": True,
}

# The model runs' timing: a warm-up call at least (its time plans the timed steps, experiments.e2e.time_decode); not
# bench-attention's steps_per_call, min_repeat_s and max_inner (a decode call times its own steps; the device probes'
# repeat length is rates.min_repeat_s)
E2E_TIMING_SCHEMA = {**{k: v for k, v in TIMING_SCHEMA.items() if k not in ("steps_per_call", "min_repeat_s",
                                                                           "max_inner")},
                     "warmup": positive_int("an integer >= 1 (the last warm-up call's time plans the timed steps)")}

E2E_COMMON = {
    **COMMON_SCHEMA,
    "timing": E2E_TIMING_SCHEMA,
    "mesh": MESH_SCHEMA,
    "model": MODEL_SCHEMA,
    "decode": DECODE_SCHEMA,
    "modes": ListOf((str,), check=lambda v: v in MODES, hint=f"one of {list(MODES)}"),
    "backend": one_of("auto", "pallas", "interpret", "xla"),
    "cpu_backend": one_of("interpret", "xla"),
}

E2E_THROUGHPUT_SCHEMA = {
    **E2E_COMMON,
    "grid": {
        "prefixes": ListOf((int,), check=lambda v: v >= 1, hint="prefix lengths >= 1"),
        "batches": ListOf((int,), check=lambda v: v >= 1, hint="batch sizes >= 1"),
        "generate": simpson_length(),
        "unique": positive_int("tokens of each sequence's own prompt suffix, >= 1"),
    },
}

LONG_DOCUMENT_SCHEMA = {
    **E2E_COMMON,
    "grid": {
        "prefixes": ListOf((int,), check=lambda v: v >= 1, hint="prefix lengths >= 1"),
        "batch": positive_int(),
        "generate": simpson_length(),
        "unique": positive_int("tokens of each sequence's own prompt suffix, >= 1"),
    },
}

TREE_VARIANTS = ("two_level", "one_level", "two_level_shared_storage", "standard")

TREE_APPS_SCHEMA = {
    **{k: v for k, v in E2E_COMMON.items() if k != "modes"},
    "tree": {
        "fewshot": positive_int(),
        "problem_prompt": Field((int,), check=lambda v: v >= 2, hint="an integer >= 2"),
        "problems": positive_int(),
        "samples": positive_int(),
        "generate": simpson_length(),
        "variants": ListOf((str,), check=lambda v: v in TREE_VARIANTS, hint=f"one of {list(TREE_VARIANTS)}"),
    },
}

SCHEMAS = {
    "bench_attention": BENCH_SCHEMA,
    "e2e_throughput": E2E_THROUGHPUT_SCHEMA,
    "long_document": LONG_DOCUMENT_SCHEMA,
    "tree_apps": TREE_APPS_SCHEMA,
}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _check_value(key: str, value: Any, types: tuple[type, ...], check, hint: str) -> None:
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"key '{key}' must be {_type_name(types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"key '{key}' must be {_type_name(types)}, got {value!r}")
    if check is not None and not check(value):
        raise ConfigError(f"key '{key}' must be {hint or 'valid'}, got {value!r}")


def validate(data: dict, schema: dict, prefix: str = "") -> None:
    """Raise ConfigError naming the first bad key of `data` under `schema`."""
    if not isinstance(data, dict):
        raise ConfigError(f"key '{prefix.rstrip('.')}' must be a table, got {data!r}")
    for key in data:
        if key.startswith("__") or key not in schema:  # "__": the schema's own markers (__optional__)
            raise ConfigError(f"unknown key '{prefix}{key}'")
    for key, spec in schema.items():
        if key.startswith("__"):
            continue
        full = f"{prefix}{key}"
        if key not in data:
            missing_ok = (isinstance(spec, dict) and spec.get("__optional__")) or (
                isinstance(spec, (Field, ListOf)) and not spec.required)
            if not missing_ok:
                raise ConfigError(f"missing key '{full}'")
            continue
        value = data[key]
        if isinstance(spec, dict):
            validate(value, spec, prefix=f"{full}.")
        elif isinstance(spec, Field):
            _check_value(full, value, spec.types, spec.check, spec.hint)
        elif isinstance(spec, ListOf):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"key '{full}' must be a non-empty array, got {value!r}")
            for i, item in enumerate(value):
                _check_value(f"{full}[{i}]", item, spec.types, spec.check, spec.hint)
            _check_distinct(full, value)
        elif isinstance(spec, Rows):
            if not isinstance(value, list) or not value:
                raise ConfigError(f"key '{full}' must be a non-empty array of tables, got {value!r}")
            for i, row in enumerate(value):
                validate(row, spec.schema, prefix=f"{full}[{i}].")
            _check_distinct(full, value)


def _check_distinct(full: str, value: list) -> None:
    """An array of points or variants names each once: a repeat would run (and record) the same thing twice."""
    for i, item in enumerate(value):
        if item in value[:i]:
            raise ConfigError(f"key '{full}' lists {item!r} twice (at {value.index(item)} and {i}): each point "
                              "or variant would run twice")


def deep_merge(base: dict, overrides: dict) -> dict:
    """Tables merge key by key; every other value (arrays included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_path(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """A path to a TOML file, or a bare config name looked up in experiments/configs/."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"{str(name_or_path)!r} is a directory, not a config file (a TOML file, or a bare name "
                          f"such as 'e2e_throughput' for {CONFIG_DIR / 'e2e_throughput.toml'})")
    if len(path.parts) > 1 or path.suffix == ".toml":  # a path that is not there: not a name to look up
        raise ConfigError(f"no config file {str(name_or_path)!r} (a bare name such as {path.stem!r} reads "
                          f"{CONFIG_DIR / (path.stem + '.toml')})")
    candidate = CONFIG_DIR / f"{path.stem}.toml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"no config file {str(name_or_path)!r} (nor {candidate})")


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` with VALUE in TOML syntax (`5`, `"xla"`, `[1, 2]`); a bare word is taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError as e:
        if value.strip()[:1] in ("[", "{", '"', "'"):  # meant as an array, a table or a string: name the typo
            raise ConfigError(f"--set {text!r}: the value is not valid TOML ({e})") from e
        parsed = value
    return key.strip().split("."), parsed


def apply_assignments(data: dict, assignments: list[str]) -> dict:
    """Command-line overrides applied last (after [smoke]); validated like the rest."""
    data = copy.deepcopy(data)
    for text in assignments:
        keys, value = parse_assignment(text)
        if keys == ["kind"] and value != data.get("kind"):  # the schema, and what runs, follow the config's kind
            raise ConfigError(f"--set {text!r}: a config's kind cannot be changed (it is {data.get('kind')!r}); "
                              "run a config of that kind")
        indexed = [k for k in keys if "[" in k or "]" in k]
        if indexed:
            raise ConfigError(f"--set {text!r}: '{indexed[0]}' indexes an array, which --set cannot; it sets whole "
                              f"values: give the whole array, e.g. --set 'bench.configs=[{{batch = 4, ...}}, ...]'")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: key '{k}' is not a table")
        node[keys[-1]] = value
    return data


def load(name_or_path: str | pathlib.Path, *, smoke: bool = False, assignments: list[str] | None = None) -> dict:
    """Load, apply `[smoke]` overrides when asked, then `--set` assignments, validate. Returns a dict with `smoke`
    set."""
    path = resolve_path(name_or_path)
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path.name}: not valid TOML: {e}") from e
        except UnicodeDecodeError as e:  # TOML is UTF-8
            raise ConfigError(f"{path.name}: not valid TOML: not UTF-8 text ({e})") from e
    return from_dict(raw, smoke=smoke, source=path.name, assignments=assignments)


def from_dict(raw: dict, *, smoke: bool = False, source: str = "<dict>", assignments: list[str] | None = None
              ) -> dict:
    raw = dict(raw)
    overrides = raw.pop("smoke", None)
    if overrides is None:
        raise ConfigError(f"{source}: missing key 'smoke' (every config needs a [smoke] table)")
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: key 'smoke' must be a table")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ConfigError(f"{source}: key 'kind' must be one of {sorted(SCHEMAS)}, got {kind!r}")
    schema = SCHEMAS[kind]
    try:
        validate(raw, schema)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if "kind" in overrides and overrides["kind"] != kind:  # the schema, and what runs, follow the config's kind
        raise ConfigError(f"{source}: key 'smoke.kind' = {overrides['kind']!r}: a smoke run keeps the config's kind "
                          f"({kind!r})")
    merged = deep_merge(raw, overrides)
    try:
        validate(merged, schema)
    except ConfigError as e:
        raise ConfigError(f"{source}: after [smoke] overrides: {e}") from None
    config = merged if smoke else raw
    if assignments:
        config = apply_assignments(config, assignments)
        try:
            validate(config, schema)
        except ConfigError as e:
            raise ConfigError(f"{source}: after --set overrides: {e}") from None
    try:
        check_together(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    config["smoke"] = smoke
    return config


def check_together(config: dict) -> None:
    """What the schema cannot check key by key: the bench rows' heads, the model shape as a whole
    (`models.LlamaConfig`), its longest sequence against its max_position_embeddings, and its split over each
    `mesh.model` size (`models.parallel.split`), so that such a config fails before anything runs, naming its key."""
    for i, row in enumerate(config.get("bench", {}).get("configs", [])):
        if row["q_heads"] % row["kv_heads"]:
            raise ConfigError(f"key 'bench.configs[{i}].kv_heads' must divide q_heads ({row['q_heads']}), got "
                              f"{row['kv_heads']}")
    if "model" not in config:
        return
    from models import LlamaConfig, parallel  # noqa: PLC0415  (only configs with a model need them)
    try:
        model = LlamaConfig(**config["model"]["shape"])
    except ValueError as e:
        raise ConfigError(f"key 'model.shape': {e}") from None
    grid, tree = config.get("grid"), config.get("tree")
    if grid or tree:  # the longest sequence a run makes must fit the model (generate refuses it, point by point)
        longest, where = ((max(grid["prefixes"]) + grid["unique"] + grid["generate"], "grid") if grid else
                          (tree["fewshot"] + tree["problem_prompt"] + tree["generate"], "tree"))
        if longest > model.max_position_embeddings:
            raise ConfigError(f"key '{where}': its longest sequence, {longest} tokens (prompt + generate), exceeds "
                              f"model.shape.max_position_embeddings = {model.max_position_embeddings}")
    sizes = config.get("mesh", {}).get("model", 1)
    for n in sizes if isinstance(sizes, list) else [sizes]:
        try:
            parallel.split(model, n)
        except ValueError as e:
            raise ConfigError(f"key 'mesh.model' = {n}: {e}") from None
