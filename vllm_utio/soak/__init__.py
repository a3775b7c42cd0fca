"""``vllm-utio soak``: a real ``vllm serve`` under load, faults and bad input.

One run starts a server on 127.0.0.1 with a UTIO config (or UTIO off), drives it with a
bounded async client (request count and wall time both capped), and writes a JSON and a
markdown report whose checks say whether anything was lost, leaked or answered 5xx.

Modules, one concern each:

- :mod:`.workload`: the request mix (ShareGPT first turns, long held-out Wikipedia
  prompts, streaming or not, chat or completions, ``n``, temperature, stop strings,
  logprobs, cut streams, per-request UTIO controls).
- :mod:`.client`: sending one request and reading its answer (streamed or not), and
  driving many at a fixed concurrency.
- :mod:`.observe`: what the server shows from outside: its process tree's resident
  memory and its ``/metrics``.
- :mod:`.identity`: greedy tokens under load vs the same request sent alone.
- :mod:`.checks`: the report's check lines, pure functions of what was observed.
- :mod:`.bad_inputs`: malformed requests and how their refusals are judged.
- :mod:`.faults`: killing the engine core of a live server.
- :mod:`.runner`: one soak run end to end; :mod:`.report`: JSON and markdown;
  :mod:`.cli`: the subcommand.
"""

from __future__ import annotations

from vllm_utio.soak.runner import SoakSettings, quick_settings, run_soak

__all__ = ["SoakSettings", "quick_settings", "run_soak"]
