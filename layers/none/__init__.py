"""The identity mixer (kind "none"): the control of ablations."""
