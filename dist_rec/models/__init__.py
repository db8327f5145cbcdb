"""Model zoo. Every module in this package registers its encoders with `base.register`;
importing the package imports them all, so adding a model is adding a file."""
import importlib
import pkgutil

from dist_rec.models.base import Dimensions, NextItemModel, build_model, register, registered_models

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Dimensions", "NextItemModel", "build_model", "register", "registered_models"]
