"""Routing: which bank entries fire at which tokens of what the model reads.

Stages, in order (each can be turned off in ``RoutingConfig``):

1. lexical, exact or normalised (``lafn_hf.routing.matcher`` with ``lafn_hf.text`` folding): a subject or alias
   completed by a token fires its entries there;
   with inflections (``lafn_hf.routing.inflection``): subjects of inflecting languages (Russian, Czech, German,
   Turkish, ...: ``RoutingConfig.inflecting_languages``) also fire with their word endings changed, and
   their multi-word subjects with the words reordered or derived (``lafn_hf.routing.reorder``);
2. aliases: more surface forms per entry (``LanguageEdit(aliases=...)``, ``EditableCausalLM.add_aliases``);
3. representation (``keys``: stored per entry at edit time; ``fire``: compared in the forward): the hidden
   state entering the entry's first edited layer is compared with the entry's key, and the entry fires at
   the first token of a sequence whose cosine passes the entry's calibrated threshold, when the lexical
   stage has not found it there. The same keys pick one entry when several share a matched subject.
4. question scope (``scope``): an entry fires, by any stage, only where the sentence around the find asks
   its own relation (states pooled outside the subject, compared with the entry's prompts and the built-in
   relation prompts of ``data/relations.json``); of several entries of one subject admitted at one token,
   the nearest fires.

``trace.routes`` reports what fired where, for debugging and for the routing benchmark.

Modules: the lexical half (``matcher``, with ``anchors``, ``inflection``, ``reorder``, ``spelling``;
``row_reader``: a row's tokens read incrementally; ``cache_rows``: the readers kept on the KV cache), the
representation half (``keys``, ``fire``, ``scope``, ``calibration``), ``config`` (``RoutingConfig``),
``compiled`` (``CompiledBank``: a bank version compiled for routing, and the plan it makes) and ``trace``.
"""

from .config import RoutingConfig
from .keys import calibrate_key_space, entry_key, layer_inputs
from .trace import Route, routes

__all__ = ["Route", "RoutingConfig", "calibrate_key_space", "entry_key", "layer_inputs", "routes"]
