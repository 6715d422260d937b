"""Logical axis names -> mesh axes. The one place that spells PartitionSpecs.

Parameters and activations are annotated with logical axis names (``"embed"``, ``"heads"``,
``"experts"`` ...). A :class:`ShardingRules` maps each name to zero, one or several mesh axes of a
mesh with axes ``data, fsdp, tensor, expert``; mesh axes missing from a mesh (or of size 1) are
dropped, so one rules object serves every mesh shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes. Replace fields with ``dataclasses.replace`` for other layouts."""

    # parameters
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = "fsdp"
    norm: MeshAxes = None
    q_rank: MeshAxes = None
    heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = None
    head_dim: MeshAxes = None
    mlp: MeshAxes = "tensor"
    router: MeshAxes = None
    experts: MeshAxes = "expert"
    expert_embed: MeshAxes = "fsdp"
    expert_mlp: MeshAxes = "tensor"
    # activations
    act_batch: MeshAxes = ("data", "fsdp")
    act_seq: MeshAxes = None
    act_embed: MeshAxes = None
    act_heads: MeshAxes = "tensor"
    act_vocab: MeshAxes = "tensor"
    cache_seq: MeshAxes = None

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        if not hasattr(self, name):
            raise ValueError(f"unknown logical axis {name!r}; ShardingRules has no field of that name")
        value = getattr(self, name)
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    def spec(
        self,
        logical_axes: Sequence[str | None],
        mesh: Mesh | None = None,
        shape: Sequence[int] | None = None,
    ) -> PartitionSpec:
        """PartitionSpec for an array annotated with ``logical_axes``.

        Mesh axes absent from ``mesh`` (or of size 1) are dropped. With ``shape``, trailing mesh axes that
        would split a dimension unevenly are dropped too (e.g. Step-3's odd vocabulary of 128815 stays whole
        rather than failing), so every rule works for every array.
        """
        used: set[str] = set()
        parts = []
        for i, name in enumerate(logical_axes):
            axes = [a for a in self.mesh_axes(name) if mesh is None or mesh.shape.get(a, 1) > 1]
            axes = [a for a in axes if a not in used]  # a mesh axis may shard only one dimension
            if shape is not None and mesh is not None:
                while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                    axes.pop()
            used.update(axes)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        return PartitionSpec(*parts)

    def sharding(
        self, mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
    ) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical_axes, mesh, shape))

    def shards(self, mesh: Mesh | None, name: str) -> int:
        """How many ways the logical axis ``name`` is split on ``mesh``."""
        if mesh is None:
            return 1
        return math.prod(mesh.shape.get(a, 1) for a in self.mesh_axes(name))


DEFAULT_RULES = ShardingRules()


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    expert: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``(data, fsdp, tensor, expert)`` mesh over ``devices`` (default: all), with automatic axes."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name!r} must be a positive int, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need != len(devices):
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"mesh {shape} needs {need} devices, but {len(devices)} were given")
    return jax.make_mesh(
        tuple(sizes.values()),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def mesh_from_spec(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from a command-line spec like ``"data=2,expert=4"`` (axes of :func:`make_mesh`; the others 1) over
    the first devices it needs of ``devices`` (default: all). ``ValueError`` naming the problem for a malformed
    pair, an unknown or repeated axis, a size below 1, or more devices than there are."""
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = (s.strip() for s in part.partition("="))
        if not name or not sep or not size.isdigit():
            raise ValueError(f"mesh {spec!r}: expected name=size pairs like data=2,expert=4, got {part!r}")
        if name not in MESH_AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r} (the axes are {', '.join(MESH_AXES)})")
        if name in sizes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
        sizes[name] = int(size)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need > len(devices):
        raise ValueError(f"mesh {spec!r} needs {need} devices, but there are {len(devices)}")
    return make_mesh(**sizes, devices=devices[:need])


def constrain(x: jax.Array, mesh: Mesh | None, rules: ShardingRules, logical_axes: Sequence[str | None]):
    """``with_sharding_constraint`` by logical axes; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, rules.sharding(mesh, logical_axes, x.shape))


def check_divisible(mesh: Mesh | None, rules: ShardingRules, logical_axis: str, size: int, what: str) -> None:
    """Raise a clear error when ``size`` (of ``what``) cannot be split evenly along ``logical_axis``."""
    n = rules.shards(mesh, logical_axis)
    if size % n:
        axes = ",".join(rules.mesh_axes(logical_axis))
        raise ValueError(
            f"{what} = {size} cannot be split over mesh axes ({axes}) of total size {n}; "
            f"choose a mesh whose {axes} size divides {size}"
        )


def spec_axes(part) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of them) as a tuple."""
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def check_block_sharding(
    mesh: Mesh,
    spec: PartitionSpec,
    shape: Sequence[int],
    block: int,
    what: str,
    logical_axes: Sequence[str | None] | None = None,
) -> None:
    """Raise a clear error naming ``what`` when ``spec`` would split a dimension of a block-scaled weight
    ``shape`` through one of its ``block``-wide scale blocks. A dimension of at most one block may be split (every
    shard shares that block's scale); a longer one needs whole blocks on every shard."""
    for dim, (size, part) in enumerate(zip(shape, spec, strict=False)):
        axes = spec_axes(part)
        n = math.prod(mesh.shape[a] for a in axes)
        if n > 1 and size > block and (size % n or (size // n) % block):
            names = ",".join(axes)
            axis = f" (logical axis {logical_axes[dim]!r})" if logical_axes else ""
            raise ValueError(
                f"{what}: dimension {dim} of size {size}{axis} split over mesh axes ({names}) of total size {n} "
                f"leaves {size / n:g} per shard; block-FP8 weights need whole {block}-wide scale blocks per shard. "
                f"Choose a mesh whose ({names}) size n makes {size} a multiple of {block} x n, or map that logical "
                "axis to other mesh axes in ShardingRules"
            )
