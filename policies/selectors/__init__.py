"""Test-time action-chunk selection: N candidates from one backbone pass, one chosen (docs/selectors.md).

Registered selectors: ``first`` (baseline), ``consistency`` (medoid), ``coherence`` (medoid + agreement
with the previous chunk's plan, BID), ``cfn`` (pseudo-count, TACO), ``world_model`` (reward from the
post-training world model), ``value`` (a critic fitted on simulator outcomes of the policy's candidates),
``dagger`` (closest to the expert chunk a network predicts for the policy's own states), ``gated`` (another
selector where validation showed it helps, the first candidate elsewhere).
"""
from policies.selectors.base import (  # noqa: F401
    SELECTOR_DIR,
    ChunkSelector,
    SelectorConfig,
    load_selector,
    make_selector,
    resolve_selector,
    sample_and_select,
    selector_config_class,
    selector_names,
)
from policies.selectors.cfn import CfnConfig, CfnSelector, CoinFlipNetwork, fit_cfn  # noqa: F401
from policies.selectors.simple import CoherenceSelector, ConsistencySelector, FirstSelector  # noqa: F401
from policies.selectors.world_model import WorldModelSelector  # noqa: F401
from policies.selectors.value import ChunkValueNet, ValueSelector  # noqa: F401
from policies.selectors.dagger import DaggerSelector  # noqa: F401
from policies.selectors.gate import GatedSelector  # noqa: F401
