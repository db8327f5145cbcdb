"""dist_rec: next-item recommenders for million-item catalogs, trained on Ray."""
__version__ = "0.1.0"
