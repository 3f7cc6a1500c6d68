"""Titans MAC / MAG / MAL (Behrouz et al. 2024, sec. 4) as token mixers, kinds "titans_mac",
"titans_mag", "titans_mal" (configs: train/titans_config.py). Importing this package registers
them; `attend` and `segments` hold the math, `parts` the shared NNX pieces."""
from models.titans import mac, mag, mal

__all__ = ["mac", "mag", "mal"]
