"""mailpipe's web layer: a Flask blueprint host apps mount, and mailpipe's own small app on it."""
