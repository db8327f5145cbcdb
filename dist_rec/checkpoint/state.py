"""RNG states as plain tensors/lists/dicts, so dense.pt loads with weights_only=True.

Randomness in this project flows through explicit generators; capture them by name together with
the process-wide torch, numpy and python states (which third-party code may still use).
"""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

Generator = torch.Generator | np.random.Generator


def rng_state(generators: Mapping[str, Generator] | None = None) -> dict[str, Any]:
    """{"torch": ByteTensor, "numpy": dict, "python": list, "generators": {name: state}}."""
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_global_state(),
        "python": [version, list(internal), gauss],
        "generators": {name: _get(generator) for name, generator in (generators or {}).items()},
    }


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, Generator] | None = None) -> None:
    """Inverse of rng_state; every generator passed must have been captured under its name."""
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"rng state has no generator {name!r}; it has {sorted(state['generators'])}")
        saved = state["generators"][name]
        if isinstance(generator, torch.Generator):
            generator.set_state(saved)
        else:
            generator.bit_generator.state = saved


def _get(generator: Generator) -> Any:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state  # a dict of str and int: plain
    raise TypeError(f"not a torch.Generator or numpy Generator: {type(generator).__name__}")


def _numpy_global_state() -> list[Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]
