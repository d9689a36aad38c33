"""The demo and its tools, for development only: not in the wheel, never imported by the product.

`make demo` runs `python -m demo` from the checkout: a built-in IMAP server (pymap, the `demo`
extra), demo mail, and a flaky link (the fault proxy the tests extend), around the real pipeline
on embedded defaults.
"""
