"""The live dashboard: a page at `/` on the worker's web server over the JSON views and the push
feed (`web.py` registers its routes; the page, script and style are in `static/`)."""
