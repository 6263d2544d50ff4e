"""The host tools behind the ``ida`` command, by role.

* ``commands`` -- what users run: ``flash``, ``console``, ``device run``, ``devices``, ``gateway``, ``resolve``,
  ``broker``, ``identifier``.
* ``harness`` -- the development harness: ``node`` (recursive-node simulator), ``sim`` (fleet), ``bench``,
  ``demo``, ``fwcheck``.
* ``support`` -- what both share: child processes, Mosquitto, board files, the device console.

Modules: ``cli`` (the dispatcher: one subcommand per module, imported lazily), ``errors`` (``CliError``, the error
a user can fix, which the dispatcher prints without a traceback; ``HintedError``, the base of the library errors
that say what to try next), ``cliargs`` (``namesakes``: options passed on under their own names).
"""
