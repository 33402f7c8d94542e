"""capture(): activations of named modules over a data loader, for `compare`.

Forward hooks record each named module's output batch by batch; conv outputs become data
points as they arrive (spatial positions, optionally subsampled; or pooled), so what is
kept is already (n, C). With `stream=`, nothing is kept: each batch's activations go
straight to a streaming metric (`StreamingCompare.update`), so datasets whose activations
do not fit in memory can be compared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparsecore.similarity.conv import ConvMode, sample_positions, to_points

_DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_layers(model: nn.Module) -> list[str]:
    """Names of the model's Linear and Conv modules (what pruning acts on), in order."""
    return [name for name, m in model.named_modules() if isinstance(m, _DEFAULT_TYPES)]


def _inputs(batch: Any) -> Any:
    """The model input of a loader batch: the batch itself or its first element."""
    return batch[0] if isinstance(batch, list | tuple) else batch


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, list | tuple) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot capture a module output of type {type(out).__name__}")


def capture(
    model: nn.Module | Sequence[nn.Module],
    loader: Iterable,
    layers: Sequence[str] | Sequence[Sequence[str]] | None = None,
    *,
    max_points: int | None = None,
    conv: ConvMode = "positions",
    spatial_samples: int | None = None,
    stream: Callable[..., None] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Tensor] | list[dict[str, Tensor]] | None:
    """Run `loader` through one model (or several, on the same batches) and collect the
    outputs of the named modules as (n, channels) activations.

    layers: module names (shared by all models), one list per model, or None for every
    Linear/Conv module. max_points: stop once every layer has this many data points (rows).
    conv / spatial_samples: conv outputs become data points by `conv`
    ("positions", "pool", "flatten"); spatial_samples=k keeps k random positions per input
    instead of all of them, the same positions for equally sized maps in every model.
    stream: called once per batch with one dict per model (e.g. StreamingCompare.update);
    then nothing is kept and None is returned. device: where inputs go (default: the first
    model's parameters). Models run in eval mode under no_grad; their mode is restored.
    Returns a dict name -> (n, C) tensor (on the device the model produced it), or a list
    of such dicts for several models.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    if layers is None:
        per_model = [default_layers(m) for m in models]
    elif layers and not isinstance(layers[0], str):
        per_model = [list(names) for names in layers]
        if len(per_model) != len(models):
            raise ValueError(f"{len(per_model)} layer lists for {len(models)} models")
    else:
        per_model = [list(layers)] * len(models)
    if device is None:
        param = next(models[0].parameters(), None)
        device = param.device if param is not None else torch.device("cpu")

    outputs: list[dict[str, Tensor]] = [{} for _ in models]
    handles = []
    modes = [m.training for m in models]
    try:
        for k, (m, names) in enumerate(zip(models, per_model)):
            modules = dict(m.named_modules())
            missing = [nm for nm in names if nm not in modules]
            if missing:
                known = [nm for nm in modules if nm][:20]
                raise KeyError(f"model {k} has no modules {missing}; some it has: {known}")
            for nm in names:
                handles.append(modules[nm].register_forward_hook(_recorder(outputs[k], nm)))
            m.eval()
        kept: list[dict[str, list[Tensor]]] = [{nm: [] for nm in names} for names in per_model]
        counts: list[dict[str, int]] = [{nm: 0 for nm in names} for names in per_model]
        with torch.no_grad():
            for b, batch in enumerate(loader):
                x = _inputs(batch)
                x = x.to(device) if isinstance(x, Tensor) else x
                batch_acts = []
                for k, m in enumerate(models):
                    outputs[k].clear()
                    m(x)
                    acts = {}
                    for nm in per_model[k]:
                        if nm not in outputs[k]:
                            raise RuntimeError(f"module {nm!r} of model {k} did not run in forward")
                        pts = _as_points(outputs[k][nm], conv, spatial_samples, seed, b)
                        if max_points is not None:
                            pts = pts[: max(0, max_points - counts[k][nm])]
                        counts[k][nm] += pts.shape[0]
                        acts[nm] = pts.to(dtype)
                    batch_acts.append(acts)
                if stream is not None:
                    stream(*batch_acts)
                else:
                    for k, acts in enumerate(batch_acts):
                        for nm, t in acts.items():
                            kept[k][nm].append(t)
                if max_points is not None and all(
                    c >= max_points for cs in counts for c in cs.values()
                ):
                    break
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(models, modes):
            m.train(mode)
    if stream is not None:
        return None
    result = [{nm: torch.cat(ts) for nm, ts in d.items()} for d in kept]
    return result[0] if isinstance(model, nn.Module) else result


def _recorder(store: dict[str, Tensor], name: str) -> Callable:
    def hook(module: nn.Module, args: Any, out: Any) -> None:
        store[name] = _first_tensor(out).detach()

    return hook


def _as_points(
    out: Tensor, conv: ConvMode, spatial_samples: int | None, seed: int, batch_index: int
) -> Tensor:
    if spatial_samples is None or out.ndim <= 2:
        return to_points(out, conv)
    # Seeded by batch and map size only: every model (and every equally sized layer) picks
    # the same positions, so paired rows stay the same points.
    gen = torch.Generator().manual_seed(hash((seed, batch_index, tuple(out.shape[2:]))) % 2**63)
    return sample_positions(out, spatial_samples, gen)
