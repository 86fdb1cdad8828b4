"""``softsae dashboard``: a self-contained HTML report of an SAE's latents and of its per-token
explanation length (k_hat for SoftSAE, L0 otherwise), from one pass over text.

- ``source``: TokenBatch, the collector's input, and ``lm_batches`` (windows through a language model);
- ``heaps``: bounded per-latent heaps and histograms;
- ``collect``: ``Collector`` (streaming statistics) -> a JSON-able dict;
- ``render``: the page (inline CSS / JS / data; no server, no network);
- ``build``: ``build_dashboard`` (the CLI's entry point);
- ``browser``: headless Chromium over the DevTools protocol (the page's test, the README screenshot).
"""

from softsae.dashboard.build import build_dashboard
from softsae.dashboard.collect import Collector, Settings
from softsae.dashboard.render import render_html, write_dashboard
from softsae.dashboard.source import TokenBatch, lm_batches

__all__ = ["build_dashboard", "Collector", "Settings", "render_html", "write_dashboard", "TokenBatch", "lm_batches"]
