"""Action heads, chunk selectors and the chunk broker. Importing this package registers them."""
from policies import flow_matching  # noqa: F401  (registers "flow_matching")
from policies import discrete  # noqa: F401  (registers "discrete")
from policies import coarse_to_fine  # noqa: F401  (registers "coarse_to_fine")
from policies import selectors  # noqa: F401  (registers "first", "consistency", "cfn", "world_model", "value")
