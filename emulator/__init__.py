"""A Smartcar API v3 emulator for tests, benchmarks and local runs.

``emulator.app`` builds the Starlette app (``create_app``, ``EmulatorConfig``), ``emulator.server``
runs it (``serve``, ``running_emulator``), ``emulator.seed`` holds its data (``default_seed``,
``seed_fleet``) and ``emulator.control`` documents the ``/_emulator/`` control API.
"""
