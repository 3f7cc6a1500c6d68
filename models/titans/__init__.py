"""Titans MAC / MAG / MAL (Behrouz et al. 2024, sec. 4) as token mixers, kinds "titans_mac",
"titans_mag", "titans_mal" (configs: models/titans/config.py). models/block.py imports their
modules, which registers them; `attend` and `segments` hold the math, `parts` the shared NNX pieces."""
