"""The relay benchmark: desktop-gateway against nginx, Apache and a direct connection, on
loopback.

Run it from the repository root (with ``pip install -e '.[bench]'`` and Debian's ``nginx`` and
``apache2`` installed)::

    python -m bench            # the full run: 5 rounds, a few minutes
    python -m bench --quick    # tiny sizes, a few seconds (the CI smoke test runs this)
    python -m bench --profile  # and then: where the gateway worker's time goes under relay load

It starts a fast KasmVNC-like backend (:mod:`bench.backend`), a private nginx configured as a plain
WebSocket tunnel (:mod:`bench.nginx`), a private Apache tunnelling with ``mod_proxy_wstunnel``
(:mod:`bench.apache`) and ``desktop-gateway serve`` with a static-endpoint desktop type
(:mod:`bench.gateway`), then measures each path with picows clients (:mod:`bench.load`) in alternating
rounds (:mod:`bench.run`) and prints the figures, their ratios and the relay's targets as plain lines
(:mod:`bench.report`). Everything listens on 127.0.0.1, every count and wait is bounded, and every
process it starts is stopped when it ends, fails or is interrupted.
"""
