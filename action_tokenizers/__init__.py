"""Action tokenizers: chunks of normalized actions <-> integer codes, behind one ``ActionTokenizer``.

Importing this package registers ``uniform``, ``adaptive_grid``, ``fast`` and ``msvq`` in the
``TokenizerConfig`` draccus choice registry (``--tokenizer.type=<name>``).
"""
from action_tokenizers.base import (  # noqa: F401
    ActionTokenizer,
    TokenizerConfig,
    make_tokenizer,
    tokenizer_config_class,
    tokenizer_names,
)
from action_tokenizers import adaptive_grid, fast, msvq, uniform  # noqa: F401,E402  (register)
from vla.data.chunks import chunks_from_dataset, make_chunks  # noqa: F401,E402  (re-exported)
