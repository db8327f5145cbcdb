"""Model zoo: importing this package registers every encoder (see base.register)."""
from dist_rec.models import hrnn  # noqa: F401
from dist_rec.models.base import Dimensions, NextItemModel, build_model, register, registered_models

__all__ = ["Dimensions", "NextItemModel", "build_model", "register", "registered_models"]
