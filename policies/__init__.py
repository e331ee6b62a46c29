"""Action heads, chunk selectors and the chunk broker. Importing this package registers them."""
from policies import flow_matching  # noqa: F401  (registers "flow_matching")
