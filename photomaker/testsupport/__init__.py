"""Test support shipped with the package: hooks that only the app's ``--tiny`` test mode and the tests use.

Nothing here runs with real models; it lives inside the package only so that ``python app.py --tiny`` (started
by the tests as a subprocess) can import it from an installed copy.
"""
