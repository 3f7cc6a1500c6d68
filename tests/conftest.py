"""Test-wide set-up. Runs before jax is imported anywhere in the test session."""
import os

# 8 simulated CPU devices for sharding tests (DESIGN.md, Testing); must precede `import jax`.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain reads absl flags; outside absl.app.run they count as unparsed and raise.
flags.FLAGS.mark_as_parsed()
